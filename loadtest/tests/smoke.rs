//! Every scenario at a small N, as CI runs them: real controller, relay,
//! nginx (when installed) and swarm processes on loopback. These check
//! what each scenario must show (who holds which connections, zombies
//! detected or masked, false downs, recovery), not speed.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-smoke-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs a scenario into a fresh directory; returns its results.json.
fn scenario(name: &str, args: &[&str]) -> (Value, PathBuf) {
    let out = out_dir(name);
    let output = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .arg(name)
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("tether-loadtest runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name} failed:\n{stderr}");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        report.contains(&format!("# tether load test: {name}")),
        "{report}"
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], name);
    assert!(
        json["meta"]["tether_version"]
            .as_str()
            .unwrap()
            .starts_with("tether "),
        "{json}"
    );
    assert!(!json["meta"]["kernel"].as_str().unwrap().is_empty());
    // The run's wall time, from its start (the ramp alone takes a while).
    assert!(json["meta"]["seconds"].as_f64().unwrap() > 0.5, "{json}");
    for plot in json["plots"].as_array().unwrap() {
        let svg = std::fs::read_to_string(out.join(plot.as_str().unwrap())).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{plot}");
    }
    (json, out)
}

fn runs(json: &Value) -> Vec<Value> {
    json["results"]["runs"].as_array().unwrap().clone()
}

fn nginx_installed() -> bool {
    [
        "/usr/sbin/nginx",
        "/usr/bin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

fn topologies(json: &Value) -> Vec<String> {
    runs(json)
        .iter()
        .map(|r| r["topology"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn compare_counts_who_holds_what() {
    let n = 300;
    let (json, out) = scenario("compare", &["--services", &n.to_string(), "--hold", "1s"]);
    let expected: &[&str] = if nginx_installed() {
        &["direct", "relay", "nginx"]
    } else {
        &["direct", "relay"]
    };
    assert_eq!(topologies(&json), expected);
    for r in runs(&json) {
        assert_eq!(r["controller"]["connections"], n, "{r}");
        assert_eq!(r["serviceConnections"], n, "{r}");
        assert_eq!(r["registeredUp"], n as f64, "{r}");
        // io_uring's direct descriptors live outside the fd tables.
        if r["io"] == "epoll" {
            assert!(
                r["controller"]["socketFds"].as_u64().unwrap() >= n as u64,
                "{r}"
            );
        }
        // The processes' own memory; the kernel's part is read machine-wide
        // and anything else on the machine (a build) moves it.
        assert!(
            r["userMemoryPerServiceBytes"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        match r["topology"].as_str().unwrap() {
            "direct" => assert!(r["gateway"].is_null()),
            // Chained: the gateway holds both sides of every service's path.
            _ => {
                assert_eq!(r["gateway"]["connections"], 2 * n, "{r}");
                assert!(
                    r["gateway"]["socketFds"].as_u64().unwrap() >= 2 * n as u64,
                    "{r}"
                );
            }
        }
        assert!(r["probes"].as_u64().unwrap() > 0, "no latency probes: {r}");
    }
    assert!(out.join("memory-vs-n.svg").exists());

    // The plan takes its costs from this very run.
    let tether = PathBuf::from(env!("CARGO_BIN_EXE_tether-loadtest")).with_file_name("tether");
    let results = out.join("results.json");
    let plan = Command::new(tether)
        .args(["plan", "--services", "100000", "--json", "--from"])
        .arg(&results)
        .output()
        .unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(
        plan["costs"]["source"]
            .as_str()
            .unwrap()
            .contains("results.json"),
        "{plan}"
    );
    let direct = runs(&json)
        .into_iter()
        .find(|r| r["topology"] == "direct")
        .unwrap();
    let user = direct["controller"]["rssGrowthKb"].as_f64().unwrap() * 1024.0 / n as f64;
    assert!(
        (plan["costs"]["controllerUserBytes"].as_f64().unwrap() - user).abs() < 1e-6,
        "{plan}"
    );
}

#[test]
fn zombies_are_detected_direct_and_masked_by_a_terminating_relay() {
    let (json, _) = scenario(
        "zombie",
        &[
            "--services",
            "200",
            "--zombies",
            "20",
            "--ping-interval",
            "1s",
            "--pong-timeout",
            "1s",
            "--wait",
            "6s",
        ],
    );
    for r in runs(&json) {
        let detected = r["detected"].as_u64().unwrap();
        match r["topology"].as_str().unwrap() {
            // nginx passes the controller's pings through to the service.
            "direct" | "nginx" => {
                assert_eq!(detected, 20, "{r}");
                assert_eq!(r["detectionSeconds"].as_array().unwrap().len(), 20);
            }
            "relay" => assert_eq!(
                detected, 0,
                "the relay answers pings for frozen services: {r}"
            ),
            other => panic!("{other}"),
        }
        assert_eq!(r["falseDowns"], 0, "{r}");
    }
}

#[test]
fn a_gateway_redeploy_downs_chained_services_only() {
    let n = 300;
    let (json, _) = scenario(
        "redeploy",
        &[
            "--services",
            &n.to_string(),
            "--before",
            "1s",
            "--after",
            "2s",
            "--topologies",
            "direct,relay",
        ],
    );
    let runs = runs(&json);
    assert_eq!(topologies(&json), ["direct", "relay"]);
    assert_eq!(runs[0]["falseDowns"], 0.0, "{}", runs[0]);
    assert_eq!(runs[0]["recoverySeconds"], 0.0, "{}", runs[0]);
    assert_eq!(runs[1]["falseDowns"], n as f64, "{}", runs[1]);
    assert!(
        runs[1]["reregistrations"].as_f64().unwrap() >= n as f64,
        "{}",
        runs[1]
    );
    assert!(
        runs[1]["recoverySeconds"].as_f64().is_some(),
        "not recovered: {}",
        runs[1]
    );
}

#[test]
fn a_controller_restart_recovers_with_and_without_jitter() {
    let n = 500;
    let (json, _) = scenario("herd", &["--services", &n.to_string(), "--before", "1s"]);
    let runs = runs(&json);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["jitter"], true);
    assert_eq!(runs[1]["jitter"], false);
    for r in runs {
        assert_eq!(r["registeredAgain"], n as f64, "{r}");
        assert!(r["recoverySeconds"].as_f64().is_some(), "{r}");
        assert!(r["reconnectCurve"].as_array().unwrap().len() > 1, "{r}");
    }
}

#[test]
fn scale_fits_cost_per_service() {
    let (json, out) = scenario(
        "scale",
        &[
            "--services",
            "100,400",
            "--hold",
            "2s",
            "--ping-interval",
            "1s",
        ],
    );
    let points = json["results"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    // The floor server registered the same swarms and pinged them.
    for p in points {
        let floor = &p["floor"];
        assert!(floor["registrationSeconds"].as_f64().unwrap() > 0.0, "{p}");
        assert!(floor["pingsDuringHold"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["pingsDuringHold"].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(
        points
            .iter()
            .all(|p| p["userBytes"].as_f64().unwrap() > 0.0),
        "{points:?}"
    );
    assert!(
        json["results"]["fit"]["totalBytesPerService"]["slope"].is_number(),
        "{json}"
    );
    assert!(out.join("scale-memory.svg").exists() && out.join("scale-cpu.svg").exists());
    assert!(out.join("scale-register.svg").exists());
}

/// The abuse scenario at a small N and 1 s per attack: every attack runs,
/// the half-open one from one address is refused past its per-source
/// bound while 20 services from another register, and no bystander is
/// cut by any of it. (The cuts that take longer than 1 s, such as the
/// 10 s message timeout, show in `tests/abuse.rs` and in a full run.)
#[test]
fn abuse_runs_every_attack_and_spares_the_bystanders() {
    let json_path = out_dir("abuse").with_extension("json");
    let output = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .args(["abuse", "--services", "500", "--duration", "1s", "--json"])
        .arg(&json_path)
        .output()
        .expect("tether-loadtest runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "abuse failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("rss peak"), "{stdout}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["attack"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "slow_lookups",
            "unregistered_partial",
            "fragment_hold",
            "subscription_flood",
            "half_open",
            "stalled_sse"
        ]
    );
    for r in runs {
        assert_eq!(r["bystandersCut"], 0, "{r}");
        assert!(r["bystanderLookups"].as_u64().unwrap() > 0, "{r}");
        assert!(r["rssPeakMib"].as_f64().unwrap() >= r["rssBeforeMib"].as_f64().unwrap() * 0.5);
    }
    let half_open = &runs[4];
    assert!(
        half_open["refusedSource"].as_f64().unwrap() > 0.0,
        "{half_open}"
    );
    assert!(
        half_open["note"]
            .as_str()
            .unwrap()
            .contains("20 of 20 services"),
        "{half_open}"
    );
    let _ = std::fs::remove_file(&json_path);
}
