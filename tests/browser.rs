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

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tether::admin::access::AdminKey;
use tether::admin::{AdminConfig, AdminServer};
use tether::agent::parse_source_ips;
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::gateway::identity::{DEV_AUDIENCE, DEV_ISSUER};
use tether::gateway::{Gateway, GatewayConfig};
use tether::jwt::{Expect, Verifier};

const KEY: &str = "a test admin key, 32 bytes long.";

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// What the browser test lacks here, if anything.
fn missing(ui: &Path) -> Option<String> {
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node".into());
    }
    if !ui.join("node_modules/playwright-core").exists() {
        return Some("ui/node_modules (run npm ci in ui/)".into());
    }
    if !chromium().exists() {
        return Some(format!(
            "{} (apt-get install chromium)",
            chromium().display()
        ));
    }
    None
}

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
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    if let Some(what) = missing(&ui) {
        assert!(
            std::env::var_os("TETHER_REQUIRE_BROWSER").is_none(),
            "the browser test needs {what}"
        );
        eprintln!("SKIPPED the browser test: no {what} here (.ci/run installs it)");
        return;
    }
    // Pinged every second, so the detail page has a round trip to show.
    let mut ctl_config = config(2);
    ctl_config.engine.ping_interval = Duration::from_secs(1);
    let ctl = start(ctl_config);
    let mut admin = AdminConfig::new("127.0.0.1:0".parse().unwrap());
    admin.key = AdminKey::new(KEY.as_bytes());
    let admin = AdminServer::start(ctl.api(), admin).unwrap();
    let mut config = GatewayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &format!("http://{}", admin.local_addr()),
        Some(AdminKey::new(KEY.as_bytes())),
    );
    config.dev_login = true;
    config.bearer = Some(Verifier::shared_secret(
        b"the browser test's dev key......",
        Expect {
            issuer: Some(DEV_ISSUER.into()),
            audience: Some(DEV_AUDIENCE.into()),
        },
    ));
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    config.access_log = Some(artifacts.join("access.jsonl"));
    let gateway = Gateway::start(config).unwrap();
    let fleet = swarm(&ctl, "svc", 1000, 10, "127.0.0.2-127.0.0.3");
    let mut canary = Some(swarm(&ctl, "canary", 1, 1, "127.0.0.4"));

    let mut child = Command::new("node")
        .current_dir(&ui)
        .arg("e2e/admin.mjs")
        .arg(gateway.public_origin())
        .arg(&artifacts)
        .arg("1001")
        .env("CHROMIUM", chromium())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The script is bounded by its own timeouts; this one bounds it too.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(180));
        // SAFETY: kill(2) with a pid we started; at worst it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let mut steps: Vec<Value> = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("browser: {line}");
        if line == "STOP canary" {
            canary.take().unwrap().stop();
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            steps.push(v);
        }
    }
    let status = child.wait().unwrap();
    drop(watchdog);
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert!(status.success(), "the browser test failed: {steps:?}");
    assert_eq!(
        names,
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
