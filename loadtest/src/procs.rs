//! Real processes on loopback and what /proc says about them. Every child
//! is killed when its handle drops, so a failed run leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `tether` binary: `--tether`, or next to this one (same target dir).
pub fn tether_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    let candidate = me.with_file_name("tether");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!(
        "no tether binary next to {}: build it with `cargo build --release --workspace` or pass --tether PATH",
        me.display()
    )
}

pub struct Proc {
    pub name: String,
    child: Child,
    lines: Option<Receiver<String>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command) -> anyhow::Result<Proc> {
        Proc::spawn_with(name, cmd, libc::SIGTERM)
    }

    /// With the signal it gets when this harness dies: SIGKILL for swarms
    /// (a frozen one would hold a SIGTERM pending forever).
    pub fn spawn_with(name: &str, mut cmd: Command, death_signal: i32) -> anyhow::Result<Proc> {
        // If this harness dies (Ctrl-C, a kill, a crash), its children get
        // SIGTERM: tether stops gracefully and nginx's master takes its
        // workers down with it. Children are spawned from the main thread,
        // which lives as long as the harness.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
                Ok(())
            });
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        Ok(Proc {
            name: name.into(),
            child,
            lines: Some(forward_lines(stdout)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line that satisfies `want`; returns it.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let lines = self.lines.as_ref().expect("stdout is read");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if want(&line) => return Ok(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "{} exited before printing the expected line (its stderr says why)",
                        self.name
                    )
                }
                Err(_) => bail!("{} printed no expected line within {timeout:?}", self.name),
            }
        }
    }

    /// Whether the process has ended.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Every line printed since the last call (without waiting).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        self.lines
            .as_ref()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL (a crash), and wait for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, then wait up to `grace` before killing.
    pub fn stop(mut self, grace: Duration) {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    /// SIGTERM (nginx's master stops its workers on it), then SIGKILL after 3 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            // A stopped process (the zombie scenario's) acts on it once continued.
            self.signal(libc::SIGCONT);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RLIMIT_NOFILE (soft) of this process: what its children inherit.
pub fn nofile() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
        .then_some(lim.rlim_cur as usize)
}

/// The pids whose parent is `pid` (from /proc/*/stat).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Distinct sockets a process holds open, over all its threads' fd tables
/// (tether's shards and relay threads each have their own, which
/// /proc/PID/fd alone does not show).
pub fn socket_fds(pid: u32) -> usize {
    let mut inodes = std::collections::HashSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for task in tasks.filter_map(Result::ok) {
        let Ok(fds) = std::fs::read_dir(task.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target.to_str().and_then(|t| t.strip_prefix("socket:["))
            {
                inodes.insert(inode.trim_end_matches(']').to_string());
            }
        }
    }
    inodes.len()
}

fn forward_lines(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A field of /proc/PID/status in kB (e.g. "VmRSS").
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_kb(&text, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn field_kb(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A field of /proc/meminfo in kB (e.g. "Slab", "SUnreclaim").
pub fn meminfo_kb(field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    field_kb(&text, field).with_context(|| format!("no {field} in /proc/meminfo"))
}

/// A counter of /proc/net/netstat (e.g. "TcpExt" "ListenOverflows").
pub fn netstat(group: &str, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
    let (names, values) = (
        lines.next().context("no header")?,
        lines.next().context("no values")?,
    );
    let index = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {group} {field}"))?;
    Ok(values
        .split_whitespace()
        .nth(index)
        .context("short line")?
        .parse()?)
}

/// Machine-wide kernel memory that sockets take: slab, its unreclaimable
/// part (what an idle socket costs), and TCP buffer pages.
#[derive(Clone, Copy, Debug)]
pub struct KernelMemory {
    pub slab_kb: i64,
    pub sunreclaim_kb: i64,
    pub tcp_mem_pages: i64,
}

impl KernelMemory {
    pub fn now() -> anyhow::Result<KernelMemory> {
        Ok(KernelMemory {
            slab_kb: meminfo_kb("Slab")? as i64,
            sunreclaim_kb: meminfo_kb("SUnreclaim")? as i64,
            tcp_mem_pages: sockstat_tcp_mem_pages()? as i64,
        })
    }

    /// Growth since `before` (negative where the machine freed more than
    /// it took meanwhile).
    pub fn since(before: KernelMemory) -> anyhow::Result<KernelMemory> {
        let now = KernelMemory::now()?;
        Ok(KernelMemory {
            slab_kb: now.slab_kb - before.slab_kb,
            sunreclaim_kb: now.sunreclaim_kb - before.sunreclaim_kb,
            tcp_mem_pages: now.tcp_mem_pages - before.tcp_mem_pages,
        })
    }
}

/// TCP pages in use from /proc/net/sockstat ("TCP: ... mem N").
pub fn sockstat_tcp_mem_pages() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in /proc/net/sockstat")?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return Ok(words.next().context("mem without a value")?.parse()?);
        }
    }
    bail!("no mem in {line:?}")
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// A loopback port nobody listens on right now (and outside the ephemeral range).
pub fn free_port() -> anyhow::Result<u16> {
    free_port_after(17_999)
}

/// The first free loopback port above `after` (below 19000).
pub fn free_port_after(after: u16) -> anyhow::Result<u16> {
    for port in after + 1..19_000u16 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {}..19000 on 127.0.0.1", after + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(status_kb(pid, "VmRSS").unwrap() > 0);
        assert!(meminfo_kb("Slab").unwrap() > 0);
        assert!(sockstat_tcp_mem_pages().is_ok());
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert_eq!(field_kb("VmRSS:\t  1234 kB\n", "VmRSS"), Some(1234));
    }
}
