//! The Admin UI's browser scripts (ui/e2e/*.mjs): headless Debian Chromium
//! driven by playwright-core under node, each step one JSON line on stdout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tether::admin::access::AdminKey;
use tether::gateway::identity::{DEV_AUDIENCE, DEV_ISSUER};
use tether::gateway::{Gateway, GatewayConfig};
use tether::jwt::{Expect, Verifier};

/// A gateway with the dev login (any user name logs in) in front of the
/// admin API at `admin` (its key `key`); its access log under artifacts/.
pub fn dev_gateway(admin: std::net::SocketAddr, key: &str) -> Gateway {
    let mut config = GatewayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &format!("http://{admin}"),
        Some(AdminKey::new(key.as_bytes())),
    );
    config.dev_login = true;
    config.bearer = Some(Verifier::shared_secret(
        b"the browser tests' dev key......",
        Expect {
            issuer: Some(DEV_ISSUER.into()),
            audience: Some(DEV_AUDIENCE.into()),
        },
    ));
    config.access_log = Some(artifacts().join("access.jsonl"));
    Gateway::start(config).unwrap()
}

pub fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

pub fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ui")
}

/// Where the scripts leave their screenshots.
pub fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// False (the test skips) when node, ui/node_modules or Chromium is
/// missing here; `.ci/run` installs them and sets TETHER_REQUIRE_BROWSER,
/// so there a missing one fails the test.
pub fn available() -> bool {
    let ui = ui_dir();
    let missing = if Command::new("node").arg("--version").output().is_err() {
        Some("node".to_string())
    } else if !ui.join("node_modules/playwright-core").exists() {
        Some("ui/node_modules (run npm ci in ui/)".into())
    } else if !chromium().exists() {
        Some(format!(
            "{} (apt-get install chromium)",
            chromium().display()
        ))
    } else {
        None
    };
    let Some(what) = missing else { return true };
    assert!(
        std::env::var_os("TETHER_REQUIRE_BROWSER").is_none(),
        "the browser test needs {what}"
    );
    eprintln!("SKIPPED the browser test: no {what} here (.ci/run installs it)");
    false
}

/// Runs `script` with `args`, killed after `limit`; every stdout line goes
/// to `on_line` (which may act on requests such as `STOP canary`). Returns
/// whether it succeeded, and its JSON steps.
pub fn run(
    script: &str,
    args: &[&str],
    limit: Duration,
    mut on_line: impl FnMut(&str),
) -> (bool, Vec<Value>) {
    let mut child = Command::new("node")
        .current_dir(ui_dir())
        .arg(script)
        .args(args)
        .env("CHROMIUM", chromium())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The script is bounded by its own timeouts; this one bounds it too.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: kill(2) with a pid we started; at worst it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let mut steps = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("browser: {line}");
        on_line(&line);
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            steps.push(v);
        }
    }
    let status = child.wait().unwrap();
    drop(watchdog);
    (status.success(), steps)
}

/// The names of the steps, in order.
pub fn names(steps: &[Value]) -> Vec<&str> {
    steps.iter().filter_map(|s| s["step"].as_str()).collect()
}
