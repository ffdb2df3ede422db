//! A shard's epoll loop: edge-triggered readiness. Accepts and receives
//! happen here, each connection read into one scratch buffer for the whole
//! shard, within read and accept budgets so one busy peer never starves
//! the rest; sends go straight to the socket until it would block.
//!
//! Owns only the epoll set, the scratch buffer and who to read again; what
//! the bytes mean is the core's.

use std::sync::atomic::Ordering;

use super::{Driver, Setup, Shard};
use crate::engine::conn::Conn;
use crate::engine::epoll::{EDGE, Epoll, HANGUP, READABLE, WRITABLE};
use crate::engine::{Handler, io, sys};
use crate::metrics::ShardStats;

/// The read buffer: every connection reads into it.
const SCRATCH: usize = 64 << 10;
/// Accepts per listener event before the others' turn.
const ACCEPT_BUDGET: usize = 512;
const EVENTS: usize = 1024;
const LISTENER: u64 = u64::MAX;
const MAILBOX: u64 = u64::MAX - 1;

pub(super) struct EpollIo {
    epoll: Epoll,
    scratch: Box<[u8]>,
    /// Connections whose read budget ran out with data possibly left.
    read_again: io::ReadAgain,
    /// Accept again before waiting (budget spent, or room freed).
    accept_now: bool,
}

impl EpollIo {
    pub(super) fn new(setup: &Setup<impl Send>) -> std::io::Result<EpollIo> {
        let wake_fd = setup.mailboxes[setup.id.0 as usize].wake_fd();
        let epoll = Epoll::new(EVENTS)?;
        epoll.add(setup.listener, READABLE | EDGE, LISTENER)?;
        epoll.add(wake_fd, READABLE, MAILBOX)?;
        Ok(EpollIo {
            epoll,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            read_again: io::ReadAgain::default(),
            accept_now: true,
        })
    }
}

impl Driver for EpollIo {
    fn transmit(
        &mut self,
        conn: &mut Conn,
        _key: u32,
        bytes: &[u8],
        stats: &ShardStats,
    ) -> Result<usize, io::Gone> {
        let sent = io::send_some(conn.handle, bytes)?;
        stats.bytes_out.fetch_add(sent as u64, Ordering::Relaxed);
        Ok(sent)
    }

    fn send_last(&mut self, conn: &Conn, _key: u32, bytes: &[u8]) {
        let _ = sys::send(conn.handle, bytes);
    }

    fn shutdown_write(&mut self, handle: i32) {
        sys::shutdown_write(handle);
    }

    fn close(&mut self, handle: i32) {
        sys::close(handle);
    }

    fn resume_accept(&mut self) {
        self.accept_now = true;
    }

    fn peer_addr(&mut self, handle: i32) -> Option<std::net::SocketAddr> {
        io::peer_addr(handle)
    }

    /// Sends go straight to the socket: nothing is held in flight.
    fn in_flight(&self) -> usize {
        0
    }

    fn in_flight_bound(&self) -> usize {
        0
    }
}

impl<H: Handler> Shard<H, EpollIo> {
    pub(super) fn run_epoll(&mut self) {
        let mut ready: Vec<(u32, u64)> = Vec::with_capacity(EVENTS);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self.until_next_tick();
            let e = &mut self.driver;
            let timeout = if e.accept_now || !e.read_again.is_empty() {
                0
            } else {
                wait.as_millis().clamp(1, 1000) as i32
            };
            let waited = e.epoll.wait(timeout).map(|events| ready.extend(events));
            if let Err(err) = waited {
                tracing::error!(shard = self.id.0, "epoll_wait failed: {err}; shard stops");
                break;
            }
            self.read_clocks();
            for (events, token) in ready.drain(..) {
                match token {
                    LISTENER => self.driver.accept_now = true,
                    MAILBOX => self.drain_mailbox(),
                    token => {
                        let (key, generation) = io::untoken(token);
                        if events & WRITABLE != 0 && self.live(key, generation) {
                            self.flush(key);
                        }
                        if events & (READABLE | HANGUP) != 0 && self.live(key, generation) {
                            self.epoll_read(key, events & HANGUP != 0);
                        }
                    }
                }
            }
            if self.driver.accept_now {
                self.epoll_accept();
            }
            for token in self.driver.read_again.take() {
                let (key, generation) = io::untoken(token);
                if self.live(key, generation) {
                    self.epoll_read(key, true);
                }
            }
            self.tick();
        }
        self.close_all();
        self.finish();
    }

    fn epoll_accept(&mut self) {
        self.driver.accept_now = false;
        for _ in 0..ACCEPT_BUDGET {
            if self.should_pause_accepts() {
                self.accept_paused = true;
                return;
            }
            match io::accept_one(self.listener) {
                io::Accepted::Socket(fd, peer) => {
                    let Some((key, generation)) = self.adopt(fd, peer) else {
                        sys::close(fd);
                        continue;
                    };
                    let interest = READABLE | WRITABLE | HANGUP | EDGE;
                    let watched = self
                        .driver
                        .epoll
                        .add(fd, interest, io::token(key, generation));
                    if let Err(e) = watched {
                        tracing::warn!(shard = self.id.0, "cannot watch an accepted socket: {e}");
                        self.drop_conn(key);
                    }
                }
                io::Accepted::Drained => return,
                io::Accepted::Failed(e) => {
                    // EMFILE, ENFILE, ENOBUFS: the backlog keeps the
                    // connections; try again when room frees or next tick.
                    self.accept_paused = true;
                    self.warn_accept(&e);
                    return;
                }
            }
        }
        self.driver.accept_now = true;
    }

    /// Reads until the socket is drained. With `hangup` (the peer shut its
    /// side in the same edge as its last data) a short read does not prove
    /// it drained: the EOF behind the data gets no edge of its own, so read
    /// on until EOF or EAGAIN.
    fn epoll_read(&mut self, key: u32, hangup: bool) {
        for _ in 0..io::READ_BUDGET {
            let Some(conn) = self.conns.get(key as usize) else {
                return;
            };
            let (handle, generation) = (conn.handle, conn.generation);
            let mut scratch = std::mem::take(&mut self.driver.scratch);
            let received = io::recv_some(handle, &mut scratch);
            if let io::Received::Data(n) = received {
                self.feed(key, &mut scratch[..n]);
            }
            let size = scratch.len();
            self.driver.scratch = scratch;
            match received {
                io::Received::Gone => return self.lost(key),
                io::Received::Drained => return,
                // A short read drained the socket, and edge-triggered
                // epoll reports anything arriving later.
                io::Received::Data(n) if (n < size && !hangup) || !self.live(key, generation) => {
                    return;
                }
                io::Received::Data(_) => {}
            }
        }
        let generation = self.conns[key as usize].generation;
        self.driver.read_again.defer(io::token(key, generation));
    }
}
