//! The audit log: two JSON lines per admin command, `sent` before it leaves
//! and `result` when it ends (who, what, target, outcome, when), sharing
//! the command's `id`. A writer thread appends them, fsyncs in batches and
//! rotates by size (`PATH` → `PATH.1` → … `PATH.N`).
//!
//! A mutating command is sent only once its `sent` line is on disk
//! (`record_durably`), so a `shutdown` that stops a service is audited even
//! if the controller dies a moment later. A write or fsync that fails keeps
//! its batch: it is counted, retried (the file reopened, backing off up to
//! a second) until it succeeds, and meanwhile the log is `failing`, which
//! fails `/readyz` and refuses mutating commands. After a failed fsync the
//! whole batch is written again, so a line may appear twice (same `id` and
//! `phase`); a write cut short resumes where it stopped.
//!
//! Bounded: the queue to the writer holds `QUEUE` lines, and a batch held
//! for a retry at most `MAX_BATCH` bytes; past them a line is counted as
//! dropped and logged to stderr instead, never blocking an admin request.
//! Without a file, lines go to the log (target `audit`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

const QUEUE: usize = 65_536;
/// Bytes one batch holds (also while it waits for a retry).
const MAX_BATCH: usize = 1 << 20;
/// Longest wait between two tries of a failed write.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

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

/// Which of a command's two lines.
#[derive(Serialize, Debug, Copy, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Before the command leaves (durable first for mutating ones).
    Sent,
    /// When it ended, or was refused without being sent.
    Result,
}

/// One admin action.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry<'a> {
    /// RFC 3339 UTC.
    pub time: String,
    /// The command's; its `sent` and `result` lines share it.
    pub id: Uuid,
    pub phase: Phase,
    pub who: &'a str,
    pub scopes: &'a str,
    /// `command` (one instance), `fanout` (by filter) or `tools`.
    pub action: &'a str,
    pub target: &'a str,
    pub tool: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The audit file cannot take a line now: the command must not be sent.
#[derive(Debug, thiserror::Error)]
#[error(
    "the audit log cannot be written ({0}); mutating commands are refused until it can: check the disk and the path's permissions"
)]
pub struct Unavailable(&'static str);

/// A line, and who waits for it to be on disk.
type Line = (String, Option<oneshot::Sender<()>>);

#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    written: AtomicU64,
    write_errors: AtomicU64,
    failing: AtomicBool,
}

pub struct Audit {
    tx: Option<SyncSender<Line>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Audit {
    /// Audit lines into the log only.
    pub fn to_log() -> Audit {
        Audit {
            tx: None,
            writer: None,
            counters: Default::default(),
        }
    }

    pub fn to_file(config: AuditConfig) -> std::io::Result<Audit> {
        let file = open_append(&config.path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let writer = std::thread::Builder::new()
            .name("tether-audit".into())
            .spawn(move || Writer::new(config, file, c).run(&rx))?;
        Ok(Audit {
            tx: Some(tx),
            writer: Some(writer),
            counters,
        })
    }

    /// Queues a line; it reaches the disk with the next batch.
    pub fn record(&self, entry: &AuditEntry<'_>) {
        let _ = self.queue(entry, None);
    }

    /// Queues a line and waits (at most `within`) until it is on disk.
    pub async fn record_durably(
        &self,
        entry: &AuditEntry<'_>,
        within: Duration,
    ) -> Result<(), Unavailable> {
        if self.tx.is_none() {
            self.record(entry);
            return Ok(());
        }
        if let Some(why) = self.refusal() {
            // Still queued: it is written once the file can be.
            self.record(entry);
            return Err(why);
        }
        let (synced, on_disk) = oneshot::channel();
        self.queue(entry, Some(synced))?;
        match tokio::time::timeout(within, on_disk).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Unavailable("the writer stopped")),
            Err(_) => Err(Unavailable("no fsync within the timeout")),
        }
    }

    fn queue(
        &self,
        entry: &AuditEntry<'_>,
        synced: Option<oneshot::Sender<()>>,
    ) -> Result<(), Unavailable> {
        let line = serde_json::to_string(entry).expect("audit entries serialize");
        let Some(tx) = &self.tx else {
            tracing::info!(target: "audit", "{line}");
            return Ok(());
        };
        match tx.try_send((line, synced)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full((line, _)) | TrySendError::Disconnected((line, _))) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "audit", "audit queue full; line not written to the file: {line}");
                Err(Unavailable("its queue is full"))
            }
        }
    }

    /// Lines that could not be queued for the file.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Lines written and synced to the file.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Writes or fsyncs of the file that failed (each retried).
    pub fn write_errors(&self) -> u64 {
        self.counters.write_errors.load(Ordering::Relaxed)
    }

    /// Why a mutating command would be refused now: the last write failed.
    pub fn refusal(&self) -> Option<Unavailable> {
        self.failing()
            .then_some(Unavailable("the last write failed"))
    }

    /// The last write failed and lines wait for a retry.
    pub fn failing(&self) -> bool {
        self.counters.failing.load(Ordering::Relaxed)
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

/// The writer thread's state: the file, and the batch not on disk yet.
struct Writer {
    config: AuditConfig,
    /// `None` after a failed reopen.
    file: Option<File>,
    size: u64,
    counters: Arc<Counters>,
    batch: Vec<u8>,
    /// `batch[written..]` has not been written yet.
    written: usize,
    lines: u64,
    waiting: Vec<oneshot::Sender<()>>,
    backoff: Duration,
    /// When the last failure was logged (one line a minute while failing).
    logged: Option<Instant>,
}

impl Writer {
    fn new(config: AuditConfig, file: File, counters: Arc<Counters>) -> Writer {
        Writer {
            size: file.metadata().map(|m| m.len()).unwrap_or(0),
            file: Some(file),
            config,
            counters,
            batch: Vec::new(),
            written: 0,
            lines: 0,
            waiting: Vec::new(),
            backoff: Duration::from_millis(50),
            logged: None,
        }
    }

    fn run(mut self, rx: &Receiver<Line>) {
        let mut open = true;
        while open || !self.batch.is_empty() {
            if open {
                open = self.gather(rx);
            }
            if self.batch.is_empty() {
                continue;
            }
            match self.flush() {
                Ok(()) => self.flushed(),
                Err(e) => {
                    self.failed(&e);
                    if !open {
                        // Stopping: one last try after a pause, then give up.
                        std::thread::sleep(self.backoff);
                        self.reopen();
                        if self.flush().is_ok() {
                            self.flushed();
                        } else {
                            tracing::error!(target: "audit", "stopping with {} audit lines not written to {}", self.lines, self.config.path.display());
                        }
                        break;
                    }
                    std::thread::sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.reopen();
                }
            }
        }
        if let Some(f) = &self.file {
            let _ = f.sync_all();
        }
    }

    /// Takes lines into the batch (waiting for the first only when the
    /// batch is empty); false once the queue is closed.
    fn gather(&mut self, rx: &Receiver<Line>) -> bool {
        let started = Instant::now();
        if self.batch.is_empty() {
            match rx.recv_timeout(self.config.sync_interval) {
                Ok(line) => self.take(line),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        while self.batch.len() < MAX_BATCH && started.elapsed() < self.config.sync_interval {
            match rx.try_recv() {
                Ok(line) => self.take(line),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    fn take(&mut self, (line, synced): Line) {
        self.batch.extend_from_slice(line.as_bytes());
        self.batch.push(b'\n');
        self.lines += 1;
        self.waiting.extend(synced);
    }

    /// Writes what is left of the batch and syncs it.
    fn flush(&mut self) -> std::io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the file is not open"))?;
        while self.written < self.batch.len() {
            match file.write(&self.batch[self.written..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if let Err(e) = file.sync_data() {
            // What the failed fsync covered may be lost: write it all again.
            self.written = 0;
            return Err(e);
        }
        Ok(())
    }

    fn flushed(&mut self) {
        self.counters
            .written
            .fetch_add(self.lines, Ordering::Relaxed);
        if self.counters.failing.swap(false, Ordering::Relaxed) {
            tracing::warn!(target: "audit", "the audit log {} is written again", self.config.path.display());
        }
        for w in self.waiting.drain(..) {
            let _ = w.send(());
        }
        self.size += self.batch.len() as u64;
        self.batch.clear();
        self.written = 0;
        self.lines = 0;
        self.backoff = Duration::from_millis(50);
        self.logged = None;
        if self.size >= self.config.max_bytes {
            match rotate(&self.config) {
                Ok(f) => {
                    self.file = Some(f);
                    self.size = 0;
                }
                Err(e) => tracing::error!(target: "audit", "cannot rotate the audit log: {e}"),
            }
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        self.counters.failing.store(true, Ordering::Relaxed);
        // Whoever waits gives up by its own timeout; the lines stay.
        self.waiting.retain(|w| !w.is_closed());
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.logged = Some(Instant::now());
            tracing::error!(target: "audit", "cannot write the audit log {} ({} lines held, retrying): {e}", self.config.path.display(), self.lines);
        }
    }

    fn reopen(&mut self) {
        match open_append(&self.config.path) {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
            }
            Err(_) => self.file = None,
        }
    }
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

    fn entry(target: &str) -> AuditEntry<'_> {
        AuditEntry {
            time: "2026-11-23T00:00:00.000Z".into(),
            id: Uuid::nil(),
            phase: Phase::Result,
            who: "alice",
            scopes: "portal.r portal.w",
            action: "command",
            target,
            tool: "check",
            outcome: Some("ok"),
            duration_ms: Some(1),
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
            audit.record(&entry(&format!("instance-{i}")));
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
