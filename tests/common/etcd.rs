//! A real etcd (Debian's etcd-server, /usr/bin/etcd) started by the test on
//! loopback ports of its own, with its data in a temporary directory;
//! stopped (and the directory removed) when dropped. It can be stopped and
//! started again on the same data and ports, as a restart.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub const ETCD: &str = "/usr/bin/etcd";

pub struct Etcd {
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    /// Serves clients over TLS with tests/keys/server.pem, and asks each
    /// for a certificate tests/keys/ca.pem signed.
    tls: bool,
    child: Option<Child>,
}

impl Etcd {
    /// None when etcd is not installed here and the test may be skipped
    /// (`.ci/run` installs it and sets TETHER_REQUIRE_ETCD, so CI never
    /// skips).
    pub fn start() -> Option<Etcd> {
        Etcd::start_with(false)
    }

    /// One that serves https only and asks clients for a certificate.
    pub fn start_tls() -> Option<Etcd> {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Etcd> {
        if !std::path::Path::new(ETCD).exists() {
            assert!(
                std::env::var_os("TETHER_REQUIRE_ETCD").is_none(),
                "the cluster tests need {ETCD} (Debian's etcd-server)"
            );
            eprintln!("SKIPPED: no {ETCD} here (.ci/run installs etcd-server)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "tether-etcd-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Etcd {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
        };
        etcd.resume();
        Some(etcd)
    }

    /// `etcd://127.0.0.1:PORT`, as `--cluster` takes it.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Starts it (again) on its data and ports; waits until clients can
    /// connect.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut etcd = Command::new(ETCD);
        if self.tls {
            let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
            etcd.arg("--cert-file")
                .arg(keys.join("server.pem"))
                .arg("--key-file")
                .arg(keys.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(keys.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = etcd
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGKILL: as a crash would), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
