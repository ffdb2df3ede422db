//! The gateway's access log: one JSON object per line, per request, to a
//! file or stdout. Lines go through a bounded queue to a writer thread, so
//! a slow disk never holds a request; lines that find the queue full are
//! counted and dropped, and the count is logged.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

/// Lines waiting for the writer.
const QUEUE: usize = 8192;

pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// To `path` (appended), or stdout.
    pub fn open(path: Option<&Path>) -> Result<AccessLog, String> {
        let mut out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open the access log {}: {e}", p.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let seen = dropped.clone();
        std::thread::Builder::new()
            .name("tether-access-log".into())
            .spawn(move || {
                let mut reported = 0;
                while let Ok(line) = rx.recv() {
                    let mut batch = line;
                    batch.push('\n');
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                        batch.push('\n');
                    }
                    if let Err(e) = out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
                        tracing::warn!("the access log cannot be written: {e}");
                    }
                    let now = seen.load(Ordering::Relaxed);
                    if now != reported {
                        tracing::warn!("{} access-log lines dropped (queue full)", now - reported);
                        reported = now;
                    }
                }
            })
            .map_err(|e| format!("cannot start the access-log writer: {e}"))?;
        Ok(AccessLog { tx, dropped })
    }

    pub fn write(&self, entry: &serde_json::Value) {
        match self.tx.try_send(entry.to_string()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}
