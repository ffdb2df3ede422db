//! The Admin UI in a real browser: headless Debian Chromium driven by
//! playwright-core (ui/e2e/admin.mjs) against a controller, its admin plane
//! and the gateway (dev login) started here, with 1,001 swarm services. It
//! logs in, sees them all, filters, opens one, lists its tools, sends
//! get_service_info and sees the reply, and sees a service go down live
//! when its swarm stops. Screenshots go to target/browser-artifacts/.
//!
//! Needs node, ui/node_modules (npm ci in ui/) and /usr/bin/chromium;
//! `.ci/run` installs them and sets TETHER_REQUIRE_BROWSER=1, so there a
//! missing one fails the test. Elsewhere it says what is missing and skips.

mod common;

use std::time::Duration;

use common::*;
use tether::admin::access::AdminKey;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::parse_source_ips;
use tether::agent::swarm::{Swarm, SwarmConfig};

const KEY: &str = "a test admin key, 32 bytes long.";

fn swarm(
    ctl: &tether::controller::Controller,
    service: &str,
    n: usize,
    distinct: usize,
    sources: &str,
) -> Swarm {
    let url = format!("ws://{}/ws/microservice", ctl.local_addr())
        .parse()
        .unwrap();
    let mut config = SwarmConfig::new(url, n);
    config.service_id = service.into();
    config.distinct_ids = distinct;
    config.sources = parse_source_ips(sources).unwrap();
    config.run_for = Some(Duration::from_secs(300));
    let swarm = Swarm::start(config).unwrap();
    assert!(swarm.wait_registered(n as u64, Duration::from_secs(60)));
    swarm
}

#[test]
fn the_admin_ui_works_in_chromium() {
    if !browser::available() {
        return;
    }
    // Pinged every second, so the detail page has a round trip to show.
    let mut ctl_config = config(2);
    ctl_config.engine.ping_interval = Duration::from_secs(1);
    let ctl = start(ctl_config);
    let mut admin = AdminConfig::new("127.0.0.1:0".parse().unwrap());
    admin.key = AdminKey::new(KEY.as_bytes());
    let admin = AdminServer::start(ctl.api(), admin).unwrap();
    let gateway = browser::dev_gateway(admin.local_addr(), KEY);
    let artifacts = browser::artifacts();
    let fleet = swarm(&ctl, "svc", 1000, 10, "127.0.0.2-127.0.0.3");
    let mut canary = Some(swarm(&ctl, "canary", 1, 1, "127.0.0.4"));

    let (ok, steps) = browser::run(
        "e2e/admin.mjs",
        &[
            gateway.public_origin(),
            &artifacts.display().to_string(),
            "1001",
        ],
        Duration::from_secs(180),
        |line| {
            if line == "STOP canary" {
                canary.take().unwrap().stop();
            }
        },
    );
    assert!(ok, "the browser test failed: {steps:?}");
    assert_eq!(
        browser::names(&steps),
        [
            "logged in",
            "table",
            "sorted",
            "filtered",
            "detail",
            "tools",
            "get_service_info",
            "down live",
            "overview",
            "done"
        ],
        "{steps:?}"
    );
    let table = steps.iter().find(|s| s["step"] == "table").unwrap();
    assert_eq!(table["total"], 1001, "{table}");
    let tools = steps.iter().find(|s| s["step"] == "tools").unwrap();
    assert!(
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "get_service_info"),
        "{tools}"
    );
    for shot in [
        "01-login",
        "02-instances",
        "02-sorted",
        "03-filtered",
        "04-detail",
        "05-down-live",
        "06-overview",
    ] {
        assert!(artifacts.join(format!("{shot}.png")).exists(), "{shot}");
    }
    drop(fleet);
}
