//! The `tether` binary as a newcomer runs it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

/// Kills the child when dropped, so a failing test leaves nothing behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first line a child prints (its ready line).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// Starts a controller and returns it with the address from its ready line.
fn controller(extra: &[&str]) -> (Running, String) {
    let (running, addr, _, _) = controller_with_admin(extra);
    (running, addr)
}

/// A fresh admin key file name for one controller (the controller makes it).
fn key_file() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("tether-cli-{}-{n}.key", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}

/// `tether controller` on loopback ports of its own, the admin API's key
/// in `keys`.
fn controller_on_loopback(keys: &str) -> Command {
    let mut command = tether();
    command.args([
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    command.args(["--admin-key-file", keys]);
    command
}

/// Also returns the admin API's address from the ready line, and its key
/// file.
fn controller_with_admin(extra: &[&str]) -> (Running, String, String, String) {
    let keys = key_file();
    let mut child = controller_on_loopback(&keys)
        .args(["--shards", "2"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    assert!(
        line.starts_with("tether controller ready: listening on 127.0.0.1:"),
        "{line}"
    );
    let addr = line.split_whitespace().nth(5).unwrap().to_string();
    let admin = line
        .rsplit("admin on ")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(line.contains(&format!("(key in {keys}")), "{line}");
    (Running(child), addr, admin, keys)
}

#[test]
fn controller_prints_one_ready_line_and_stops_on_sigterm() {
    let (mut running, addr) = controller(&[]);
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    drop(c.try_clone());
    unsafe_free_sigterm(running.0.id());
    let status = running.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::io::Write::write(&mut c, b"x");
}

fn unsafe_free_sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn bad_flags_exit_non_zero_with_a_clear_message() {
    let out = tether()
        .args(["controller", "--ping-interval", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a duration"), "{err}");

    let out = tether()
        .args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--max-conns-per-shard",
            "999999999",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RLIMIT_NOFILE"), "{err}");
}

#[test]
fn etcd_tls_files_are_checked_before_the_controller_starts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tether-cli-etcd-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    let admin_key = key_file();
    let open_key = dir.join("client.key");
    std::fs::copy(keys.join("client.key"), &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let k = |f: &str| keys.join(f).display().to_string();
    let (ca, cert, open) = (k("ca.pem"), k("client.pem"), open_key.display().to_string());
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--cluster-ca", "/nonexistent/ca.pem"],
            "cannot read --cluster-ca",
        ),
        (
            vec!["--cluster-ca", &cert, "--cluster-cert", &cert],
            "--cluster-key",
        ),
        (vec!["--cluster-ca", &open], "no PEM CERTIFICATE"),
        (
            vec![
                "--cluster-ca",
                &ca,
                "--cluster-cert",
                &cert,
                "--cluster-key",
                &open,
            ],
            "chmod 600",
        ),
    ];
    for (flags, says) in cases {
        let out = controller_on_loopback(&admin_key)
            .args(["--cluster", "etcd://127.0.0.1:1", "--node-id", "a"])
            .args(&flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&admin_key);
}

#[test]
fn a_port_in_use_is_reported() {
    let (_running, addr) = controller(&[]);
    let out = tether()
        .args(["controller", "--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    // After trying again for a while (a controller that just exited may
    // still hold the port).
    assert!(err.contains("trying again"), "{err}");
}

#[test]
fn the_swarm_reports_its_ramp_until_all_are_registered() {
    let (_running, addr) = controller(&[]);
    let out = tether()
        .args([
            "agent",
            "--controller",
            &format!("ws://{addr}/ws/microservice"),
            "--service-id",
            "cli",
        ])
        .args([
            "--swarm",
            "300",
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--exit-after",
            "3s",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("swarm: all 300 registered in"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("swarm: registered=300 target=300")),
        "{stdout}"
    );
}

#[test]
fn a_single_agent_registers_and_deregisters_on_sigint() {
    let (_running, addr) = controller(&[]);
    let mut agent = Running(
        tether()
            .args([
                "agent",
                "--controller",
                &format!("ws://{addr}"),
                "--service-id",
                "one",
                "--address",
                "10.1.2.3",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Its lines through a channel, so every wait below is bounded (a
    // controller that died would otherwise leave this test reading forever).
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = agent.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the agent registers within 10 s");
    assert!(first.starts_with("registered as "), "{first}");
    let deadline = Instant::now() + Duration::from_secs(10);
    Command::new("kill")
        .args(["-INT", &agent.0.id().to_string()])
        .status()
        .unwrap();
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "deregistered"), "{rest:?}");
    assert!(agent.0.wait().unwrap().success());
    assert!(Instant::now() < deadline);
}

#[test]
fn status_and_services_read_the_admin_api() {
    let (_running, addr, admin, keys) = controller_with_admin(&[]);
    let swarm = tether()
        .args([
            "agent",
            "--controller",
            &format!("ws://{addr}/ws/microservice"),
            "--service-id",
            "cli",
        ])
        .args([
            "--swarm",
            "120",
            "--distinct-ids",
            "3",
            "--source-ips",
            "127.0.0.2",
            "--exit-after",
            "20s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut swarm = Running(swarm);
    let mut lines = BufReader::new(swarm.0.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("all 120 registered")));
    let admin_url = format!("http://{admin}");

    let out = tether()
        .args(["status", "--admin", &admin_url, "--admin-key-file", &keys])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("instances 120 (up 120, down 0), 3 distinct services"),
        "{text}"
    );
    // Both tables line up: in each, every line has its column edges where
    // the first rule has them (numbers used to drift off their headers).
    assert!(
        text.contains("| SHARD | CONNECTIONS | UPGRADED | ADMITTED |"),
        "{text}"
    );
    let edges = |l: &str| {
        l.match_indices(['|', '+'])
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let tables: Vec<&str> = text.split("\n\n").filter(|b| b.starts_with('+')).collect();
    assert_eq!(tables.len(), 2, "{text}");
    for t in tables {
        let first = edges(t.lines().next().unwrap());
        assert!(t.lines().all(|l| edges(l) == first), "{t}");
    }

    let out = tether()
        .args([
            "services",
            "--admin",
            &admin_url,
            "--admin-key-file",
            &keys,
            "--service-id",
            "cli-1",
            "--limit",
            "7",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("7 of 40 shown; next page: --cursor"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" cli-1 ")).count(),
        7,
        "{text}"
    );

    let out = tether()
        .args(["services", "--admin", &admin_url, "--json", "--limit", "1"])
        .env("TETHER_ADMIN_KEY_FILE", &keys)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["total"], 120);

    let out = tether()
        .args([
            "status",
            "--admin",
            "http://127.0.0.1:1",
            "--admin-key-file",
            &keys,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

#[test]
fn sigterm_with_an_open_event_stream_exits_promptly() {
    let (mut running, _, admin, keys) = controller_with_admin(&[]);
    let url = format!("http://{admin}/events");
    let bearer = format!("Bearer {}", std::fs::read_to_string(&keys).unwrap().trim());
    // An SSE stream stays open until the controller ends it.
    let reader = std::thread::spawn(move || {
        let mut response = ureq::get(&url)
            .header("authorization", &bearer)
            .call()
            .unwrap();
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut response.body_mut().as_reader(), &mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()
        .unwrap();
    let status = running.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let text = reader.join().unwrap();
    assert!(
        text.contains("event: hello") && text.contains("event: stopping"),
        "{text}"
    );
}

#[test]
fn plan_prints_direct_and_chained_needs() {
    let out = tether()
        .args([
            "plan",
            "--services",
            "100000",
            "--nofile",
            "20000",
            "--cores",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["services"], 100000);
    assert_eq!(plan["direct"]["controllerSockets"], 100000);
    assert_eq!(plan["relay"]["gatewaySockets"], 200000);
    // 100,000 over fd tables of 20,000: six shards.
    assert_eq!(plan["shards"], 6);
    let direct = plan["direct"]["totalMemoryBytes"].as_f64().unwrap();
    assert!(plan["relay"]["totalMemoryBytes"].as_f64().unwrap() > direct);

    let text = tether()
        .args(["plan", "--services", "1000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("chained (tether relay)") && text.contains("fs.nr_open"),
        "{text}"
    );

    let bad = tether()
        .args([
            "plan",
            "--services",
            "10",
            "--from",
            "/nonexistent/results.json",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/results.json"));
}

#[test]
fn tune_check_says_what_the_host_lacks() {
    // A thousand services fit any host that runs this suite.
    let ok = tether()
        .args([
            "tune",
            "check",
            "--services",
            "1000",
            "--listen-port",
            "8438",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("RLIMIT_NOFILE") && text.contains("memory available"),
        "{text}"
    );
    // Memory for ten billion sockets no host here has: a failed check, its fix, exit 1.
    let short = tether()
        .args(["tune", "check", "--services", "10000000000", "--json"])
        .output()
        .unwrap();
    assert!(!short.status.success());
    let checks: serde_json::Value = serde_json::from_slice(&short.stdout).unwrap();
    let memory = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["what"] == "memory available")
        .unwrap();
    assert_eq!(memory["ok"], false);
    assert!(memory["fix"].as_str().unwrap().contains("MiB"), "{memory}");
    // One shard for 10 million services: one fd table cannot hold them;
    // the fix names the shard count that can.
    let one_shard = tether()
        .args([
            "tune",
            "check",
            "--services",
            "10000000",
            "--shards",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(!one_shard.status.success());
    let checks: serde_json::Value = serde_json::from_slice(&one_shard.stdout).unwrap();
    let fds = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["what"].as_str().unwrap().starts_with("RLIMIT_NOFILE"))
        .unwrap();
    assert_eq!(fds["what"], "RLIMIT_NOFILE per fd table (--shards 1)");
    assert_eq!(fds["ok"], false, "{fds}");
    assert!(
        fds["fix"].as_str().unwrap().contains("LimitNOFILE"),
        "{fds}"
    );
    // A ping interval under the controller's tick is refused.
    let fast = tether()
        .args(["plan", "--services", "10", "--ping-interval", "10ms"])
        .output()
        .unwrap();
    assert!(!fast.status.success());
    assert!(String::from_utf8_lossy(&fast.stderr).contains("at least 100ms"));
}

/// Service managers and container runtimes often start a process with a soft
/// RLIMIT_NOFILE of 1024 under a far higher hard limit; shards size their fd
/// tables from the soft one, so the controller must raise it.
#[test]
fn the_controller_raises_its_soft_fd_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    assert!(
        hard.rlim_max > 1024,
        "this host's hard limit is too low to test"
    );
    let mut cmd = tether();
    cmd.args([
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--no-admin",
        "--shards",
        "2",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; it runs in the forked child only.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 1024;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Running(cmd.spawn().unwrap());
    let line = first_line(&mut child.0);
    assert!(line.starts_with("tether controller ready"), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let open_files: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(open_files, [hard.rlim_max, hard.rlim_max], "{limits}");
}

#[test]
fn a_dev_gateway_logs_in_with_tether_tokens_and_refuses_unsafe_setups() {
    let (_ctl, _, admin, keys) = controller_with_admin(&[]);
    let runtime = std::env::temp_dir().join(format!("tether-cli-gw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runtime);
    std::fs::create_dir_all(&runtime).unwrap();
    let dev_key = runtime.join("dev.key");
    let dev_key = dev_key.to_str().unwrap();
    let upstream = format!("http://{admin}");
    let gateway = |extra: &[&str]| {
        let mut c = tether();
        c.args([
            "gateway",
            "--upstream",
            &upstream,
            "--upstream-key-file",
            &keys,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    };
    // No way to log anyone in, or --dev on a public address: refused.
    for (extra, says) in [
        (
            vec!["--listen", "127.0.0.1:0"],
            "needs a way to log users in",
        ),
        (vec!["--dev", "--listen", "0.0.0.0:0"], "loopback"),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--jwks-url",
                "http://127.0.0.1:9/jwks",
            ],
            "--audience",
        ),
    ] {
        let out = gateway(&extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
    let mut child = gateway(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--dev-key-file",
        dev_key,
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let line = first_line(&mut child);
    let _gw = Running(child);
    assert!(
        line.starts_with("tether gateway ready: http://127.0.0.1:"),
        "{line}"
    );
    let base = line.split_whitespace().nth(3).unwrap().to_string();
    let mint = |scope: &str| {
        let out = tether()
            .args([
                "token",
                "--scope",
                scope,
                "--user",
                "ops",
                "--dev-key-file",
                dev_key,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let call = |path: &str, token: &str, body: Option<&str>| {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {token}");
        let mut r = match body {
            Some(b) => agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(b)
                .unwrap(),
            None => agent
                .get(&url)
                .header("authorization", &auth)
                .call()
                .unwrap(),
        };
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (status, body) = call("/api/summary", &mint("portal.r"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"total\":0"), "{body}");
    let (status, body) = call(
        "/api/commands",
        &mint("portal.r"),
        Some(r#"{"name":"shutdown","serviceId":"none"}"#),
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = call(
        "/api/commands",
        &mint("portal.w"),
        Some(r#"{"name":"shutdown","serviceId":"none"}"#),
    );
    assert_ne!(status, 403, "{body}");
    assert_eq!(call("/api/summary", "forged", None).0, 401);
    let _ = std::fs::remove_dir_all(&runtime);
}

/// The Kubernetes manifests in tuning/ pass tether only flags it has: each
/// `--flag` of a container whose args start with `controller` or `gateway`
/// is in that command's --help.
#[test]
fn the_kubernetes_manifests_use_only_flags_tether_knows() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/kubernetes");
    let help = |command: &str| {
        let out = tether().args([command, "--help"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let (controller, gateway) = (help("controller"), help("gateway"));
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut within: Option<&str> = None;
        for line in text.lines().map(str::trim) {
            // A flag commented out for the reader to turn on must exist too.
            let line = line
                .strip_prefix("# ")
                .filter(|l| l.starts_with("- --"))
                .unwrap_or(line);
            if line.starts_with('#') {
                continue;
            }
            match line {
                "- controller" => within = Some(&controller),
                "- gateway" => within = Some(&gateway),
                _ if line.starts_with("- --") => {
                    if let Some(help) = within {
                        let flag = line[2..].split(['=', ' ']).next().unwrap();
                        assert!(
                            help.contains(&format!("{flag} "))
                                || help.contains(&format!("{flag}\n")),
                            "{}: {flag} is not a flag of tether",
                            path.display()
                        );
                        checked += 1;
                    }
                }
                _ if !line.starts_with("- ") => within = None,
                _ => {}
            }
        }
    }
    assert!(checked > 30, "only {checked} flags found");
}

/// A crash (SIGKILL) of an io_uring controller with thousands of
/// services: once the process is gone, so is its listener, at once. (An
/// accept waiting in the kernel held it until the dead ring was torn
/// down in the background: the port stayed taken, and connects landed in
/// a queue nobody would accept from.)
#[test]
fn a_crashed_io_uring_controller_leaves_no_listener_behind() {
    let (mut running, addr) = controller(&["--io", "uring"]);
    let services = 30_000;
    let mut swarm = Running(
        tether()
            .args([
                "agent",
                "--controller",
                &format!("ws://{addr}/ws/microservice"),
                "--service-id",
                "crash",
            ])
            .args(["--swarm", &services.to_string()])
            .args(["--source-ips", "127.0.0.2-127.0.0.5"])
            .args(["--connect-rate", "20000", "--exit-after", "60s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = BufReader::new(swarm.0.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut registered = false;
    for line in lines.lines() {
        let line = line.unwrap();
        if line.contains(&format!("all {services} registered")) {
            registered = true;
            break;
        }
        assert!(Instant::now() < deadline, "the swarm did not register");
    }
    assert!(registered, "the swarm ended before registering");
    running.0.kill().unwrap();
    running.0.wait().unwrap();
    let refused = std::net::TcpStream::connect(&addr);
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "nothing listens on {addr} once the controller is gone"
    );
    // The port is free for the next controller at once.
    let listener = std::net::TcpListener::bind(&addr);
    assert!(listener.is_ok(), "{addr}: {listener:?}");
}
