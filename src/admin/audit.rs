//! The audit log: one JSON line per admin command (who, what, target,
//! result, when), appended by a writer thread that fsyncs in batches and
//! rotates by size (`PATH` → `PATH.1` → … `PATH.N`).
//!
//! Bounded: the queue to the writer holds `QUEUE` lines; past it a line is
//! counted as dropped and logged to stderr instead, never blocking an admin
//! request. Without a file, lines go to the log (target `audit`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

const QUEUE: usize = 65_536;

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Rotate when the file passes this size.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.keep`).
    pub keep: usize,
    /// Lines are fsync'd at least this often while they arrive.
    pub sync_interval: Duration,
}

impl AuditConfig {
    pub fn new(path: PathBuf) -> AuditConfig {
        AuditConfig {
            path,
            max_bytes: 64 << 20,
            keep: 5,
            sync_interval: Duration::from_millis(200),
        }
    }
}

/// One admin action.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry<'a> {
    /// RFC 3339 UTC.
    pub time: String,
    pub who: &'a str,
    pub scopes: &'a str,
    /// `command` (one instance) or `fanout` (by filter).
    pub action: &'a str,
    pub target: String,
    pub tool: &'a str,
    pub outcome: String,
    pub duration_ms: u64,
}

pub struct Audit {
    tx: Option<SyncSender<String>>,
    writer: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Audit {
    /// Audit lines into the log only.
    pub fn to_log() -> Audit {
        Audit {
            tx: None,
            writer: None,
            dropped: Default::default(),
            written: Default::default(),
        }
    }

    pub fn to_file(config: AuditConfig) -> std::io::Result<Audit> {
        let file = open_append(&config.path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let writer = std::thread::Builder::new()
            .name("tether-audit".into())
            .spawn(move || write_loop(config, file, rx, w))?;
        Ok(Audit {
            tx: Some(tx),
            writer: Some(writer),
            dropped: Default::default(),
            written,
        })
    }

    pub fn record(&self, entry: &AuditEntry<'_>) {
        let line = serde_json::to_string(entry).expect("audit entries serialize");
        match &self.tx {
            None => tracing::info!(target: "audit", "{line}"),
            Some(tx) => match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "audit", "audit queue full; line not written to the file: {line}");
                }
            },
        }
    }

    /// Lines that could not be queued for the file.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines written and synced to the file.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // Closing the queue makes the writer flush, sync and exit.
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn write_loop(config: AuditConfig, mut file: File, rx: Receiver<String>, written: Arc<AtomicU64>) {
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut batch: Vec<u8> = Vec::new();
    let mut lines = 0u64;
    loop {
        let first = match rx.recv_timeout(config.sync_interval) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let started = Instant::now();
        for line in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            batch.extend_from_slice(line.as_bytes());
            batch.push(b'\n');
            lines += 1;
            if started.elapsed() >= config.sync_interval || batch.len() >= 1 << 20 {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = file.write_all(&batch).and_then(|()| file.sync_data()) {
            tracing::error!(target: "audit", "cannot write the audit log {}: {e}", config.path.display());
        } else {
            written.fetch_add(lines, Ordering::Relaxed);
        }
        size += batch.len() as u64;
        batch.clear();
        lines = 0;
        if size >= config.max_bytes {
            match rotate(&config) {
                Ok(f) => {
                    file = f;
                    size = 0;
                }
                Err(e) => tracing::error!(target: "audit", "cannot rotate the audit log: {e}"),
            }
        }
    }
    let _ = file.sync_all();
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rotate(config: &AuditConfig) -> std::io::Result<File> {
    for n in (1..config.keep).rev() {
        let from = rotated(&config.path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(&config.path, n + 1))?;
        }
    }
    std::fs::rename(&config.path, rotated(&config.path, 1))?;
    open_append(&config.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> AuditEntry<'static> {
        AuditEntry {
            time: "2026-11-23T00:00:00.000Z".into(),
            who: "alice",
            scopes: "portal.r portal.w",
            action: "command",
            target: format!("instance-{i}"),
            tool: "check",
            outcome: "ok".into(),
            duration_ms: 1,
        }
    }

    #[test]
    fn lines_are_written_synced_and_rotated_by_size() {
        let dir = std::env::temp_dir().join(format!("tether-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let config = AuditConfig {
            path: path.clone(),
            max_bytes: 2_000,
            keep: 3,
            sync_interval: Duration::from_millis(5),
        };
        let audit = Audit::to_file(config).unwrap();
        for i in 0..100 {
            audit.record(&entry(i));
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        drop(audit);
        let mut all = Vec::new();
        for p in [
            rotated(&path, 3),
            rotated(&path, 2),
            rotated(&path, 1),
            path.clone(),
        ] {
            if let Ok(text) = std::fs::read_to_string(&p) {
                all.extend(
                    text.lines()
                        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
                );
            }
        }
        assert!(rotated(&path, 1).exists(), "rotated at least once");
        assert!(!rotated(&path, 4).exists(), "keeps at most 3 rotated files");
        // The newest lines are all there and in order.
        let last = all.last().unwrap();
        assert_eq!(last["target"], "instance-99");
        let targets: Vec<usize> = all
            .iter()
            .map(|v| v["target"].as_str().unwrap()[9..].parse().unwrap())
            .collect();
        assert!(
            targets.windows(2).all(|w| w[1] == w[0] + 1),
            "no gaps among kept lines"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
