//! A shard's io_uring loop: completions. One-shot accepts submitted when
//! the listener has connections waiting (none waits in the kernel), straight
//! into direct descriptors and each telling its peer's address, multishot
//! receive from a ring of provided buffers
//! (an idle connection owns no read buffer), one send in flight per
//! connection (so its bytes stay in order), and the next tick as the
//! submit-and-wait timeout.
//!
//! Owns only the ring and what must be re-armed; what the bytes mean is
//! the core's.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Driver, Setup, Shard};
use crate::engine::conn::Conn;
use crate::engine::uring::{Accepted, Completion, MAX_SEND, Op, SendDone, Uring};
use crate::engine::wheel::Tick;
use crate::engine::{Handler, OVER_CAP_GRACE, io, sys};
use crate::metrics::{self, ShardStats};

/// Direct-descriptor slots beyond the connection bound, for sockets whose
/// close is still in flight.
const SLOT_SLACK: usize = 32;

pub(super) struct UringIo {
    ring: Uring,
    /// After an accept error, accept again no sooner than this tick.
    accept_retry: Tick,
    /// Receives that ended (no buffer was free) and must be armed again.
    rearm: Vec<(u32, u32)>,
    completions: Vec<Completion>,
}

impl UringIo {
    pub(super) fn new(setup: &Setup<impl Send>) -> std::io::Result<UringIo> {
        let wake_fd = setup.mailboxes[setup.id.0 as usize].wake_fd();
        let nofile = sys::nofile_limit().unwrap_or(1024) as usize;
        let slots =
            (setup.config.max_conns_per_shard + OVER_CAP_GRACE + SLOT_SLACK).min(nofile) as u32;
        let mut ring = Uring::new(slots, setup.config.uring_recv_buffers)?;
        ring.watch(wake_fd);
        ring.listen(setup.listener);
        ring.accept(setup.listener);
        Ok(UringIo {
            ring,
            accept_retry: 0,
            rearm: Vec::new(),
            completions: Vec::with_capacity(4096),
        })
    }

    /// Waits (bounded) until nothing of ours is left in the kernel: the
    /// last frames out, every slot closed, every receive ended. Past the
    /// bound the ring keeps its buffers mapped on drop.
    fn quiesce(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut completions = Vec::new();
        while !self.ring.quiescent() && Instant::now() < deadline {
            completions.clear();
            if self
                .ring
                .wait(Duration::from_millis(10), &mut completions)
                .is_err()
            {
                break;
            }
            for c in &completions {
                match c.op {
                    Some(Op::Send(index)) => {
                        let done = self.ring.send_done(index, c.result.max(0) as usize);
                        if let Some(SendDone::Partial { .. }) = done {
                            self.ring.resend(index);
                        }
                    }
                    Some(Op::ShutWr(slot)) => self.ring.shutdown_done(slot),
                    Some(Op::Recv(..)) => {
                        if let Some(bid) = c.buffer() {
                            let buf = self.ring.received(bid, c.result.max(0) as usize);
                            self.ring.recycle(buf);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Driver for UringIo {
    fn transmit(
        &mut self,
        conn: &mut Conn,
        key: u32,
        bytes: &[u8],
        _stats: &ShardStats,
    ) -> Result<usize, io::Gone> {
        // One send in flight per connection keeps its bytes in order; the
        // bytes are counted out when the send completes.
        if conn.is_sending() || bytes.is_empty() {
            return Ok(0);
        }
        // At most MAX_SEND in flight: the rest stays queued and counted.
        let bytes = &bytes[..bytes.len().min(MAX_SEND)];
        self.ring
            .send(conn.handle as u32, key, conn.generation, bytes);
        conn.set_sending(true);
        Ok(bytes.len())
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    fn in_flight_bound(&self) -> usize {
        MAX_SEND
    }

    fn send_last(&mut self, conn: &Conn, key: u32, bytes: &[u8]) {
        self.ring
            .send(conn.handle as u32, key, conn.generation, bytes);
    }

    fn shutdown_write(&mut self, handle: RawFd) {
        self.ring.shutdown_write(handle as u32);
    }

    fn close(&mut self, handle: RawFd) {
        // A receive or send still in flight completes on its own (as
        // stale, by generation); the slot frees when the close is done.
        self.ring.close(handle as u32);
    }

    /// The loop re-arms the accept itself once `accept_paused` clears.
    fn resume_accept(&mut self) {}

    fn peer_addr(&mut self, handle: RawFd) -> Option<std::net::SocketAddr> {
        // A direct descriptor has no getpeername: lend it to the fd table
        // for the one call.
        match self.ring.install(handle as u32) {
            Ok(fd) => io::peer_addr(std::os::fd::AsRawFd::as_raw_fd(&fd)),
            Err(e) => {
                tracing::debug!("cannot install a direct descriptor to read its peer: {e}");
                None
            }
        }
    }
}

impl<H: Handler> Shard<H, UringIo> {
    pub(super) fn run_uring(&mut self) {
        let mut completions = std::mem::take(&mut self.driver.completions);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = if self.driver.rearm.is_empty() {
                self.until_next_tick()
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.driver.ring.wait(wait, &mut completions) {
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) {
                    // The kernel is short of memory for requests: try again.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                // A shard that stopped would strand its connections and
                // leave its mailbox unanswered: stop the process instead.
                tracing::error!(
                    shard = self.id.0,
                    "io_uring wait failed: {e}; aborting the controller"
                );
                std::process::abort();
            }
            self.read_clocks();
            for c in completions.drain(..) {
                self.completed(c);
            }
            for (key, generation) in std::mem::take(&mut self.driver.rearm) {
                if self.live(key, generation) {
                    let slot = self.conns[key as usize].handle as u32;
                    self.driver.ring.recv(slot, key, generation);
                }
            }
            self.maybe_resume_accepts();
            let (now, paused, listener) = (self.now, self.accept_paused, self.listener);
            let u = &mut self.driver;
            if !paused && now >= u.accept_retry {
                // Arms those that completed (a no-op when all are armed).
                u.ring.accept(listener);
            }
            self.tick();
        }
        self.driver.completions = completions;
        if self.driver.ring.accept_armed() {
            // No new connections while we close the ones we have.
            self.driver.ring.cancel_accept();
        }
        self.close_all();
        self.driver.quiesce();
        self.finish();
    }

    /// A 24-bit generation from a receive's user_data names this
    /// connection if the low 24 bits match.
    fn live24(&self, key: u32, generation24: u32) -> Option<u32> {
        self.conns
            .get(key as usize)
            .filter(|c| c.generation & 0xFF_FFFF == generation24)
            .map(|c| c.generation)
    }

    fn completed(&mut self, c: Completion) {
        match c.op {
            Some(Op::Accept(index)) => self.accept_done(&c, index),
            Some(Op::Recv(key, generation24)) => self.recv_done(&c, key, generation24),
            Some(Op::Send(index)) => self.send_done(&c, index),
            Some(Op::ShutWr(slot)) => self.driver.ring.shutdown_done(slot),
            Some(Op::Mailbox) => {
                if !c.more() {
                    let fd = self.mailboxes[self.id.0 as usize].wake_fd();
                    self.driver.ring.watch(fd);
                }
                self.drain_mailbox();
            }
            // An install that outlived its wait: nobody holds its fd.
            Some(Op::Install) if c.result >= 0 => sys::close(c.result),
            Some(Op::Listener) => self.driver.ring.listener_ready(&c),
            Some(Op::Quiet | Op::Closed | Op::Install) | None => {}
        }
    }

    /// Accept `index` produced a socket (a direct descriptor, and its
    /// peer's address) or an error. It is armed again at once, unless the
    /// shard is at its bound.
    fn accept_done(&mut self, c: &Completion, index: u32) {
        match self.driver.ring.accepted(index, c.result) {
            Accepted::Socket(slot, peer) => {
                match self.adopt(slot as RawFd, peer) {
                    Some((key, generation)) => {
                        let ring = &mut self.driver.ring;
                        ring.nodelay(slot);
                        ring.recv(slot, key, generation);
                    }
                    None => self.driver.ring.close(slot),
                }
                if self.should_pause_accepts() {
                    // Stop taking connections: the backlog keeps them
                    // until room frees.
                    self.accept_paused = true;
                    self.driver.ring.cancel_accept();
                } else if !self.accept_paused && self.now >= self.driver.accept_retry {
                    self.driver.ring.accept(self.listener);
                }
            }
            Accepted::Nothing => {}
            Accepted::Failed(errno) => {
                // ENFILE (no free slot: closes still in flight), EMFILE,
                // ENOBUFS. The kernel may have taken the connection before
                // it found no slot, so the other accepts armed are
                // cancelled rather than each lose one the same way; accept
                // again at the next tick, not at once.
                let next = self.now + 1;
                self.driver.accept_retry = next;
                self.driver.ring.cancel_accept();
                self.warn_accept(&std::io::Error::from_raw_os_error(errno));
            }
        }
    }

    /// A receive completed: data for the core, the peer's EOF, or no
    /// buffer free (the data waits in the socket until re-armed).
    fn recv_done(&mut self, c: &Completion, key: u32, generation24: u32) {
        let live = self.live24(key, generation24);
        let mut buf = c
            .buffer()
            .map(|bid| self.driver.ring.received(bid, c.result.max(0) as usize));
        match (c.result, live) {
            (n, Some(_)) if n > 0 => {
                let data = buf
                    .as_mut()
                    .expect("a receive with data selected a buffer")
                    .data();
                self.feed(key, data);
            }
            (_, None) => {}
            (0, Some(_)) => self.lost(key),
            (e, Some(generation)) if e == -libc::ENOBUFS => {
                // No buffer was free: the data waits in the socket;
                // arm again once buffers are back.
                metrics::inc(&self.stats().recv_rearms);
                self.driver.rearm.push((key, generation));
            }
            (_, Some(_)) => self.lost(key),
        }
        if let Some(buf) = buf {
            self.driver.ring.recycle(buf);
        }
        if c.result > 0
            && !c.more()
            && let Some(generation) = self.live24(key, generation24)
        {
            self.driver.rearm.push((key, generation));
        }
    }

    /// A send completed: in part (the rest goes out on the same
    /// connection only), or whole (the next unsent bytes may go).
    fn send_done(&mut self, c: &Completion, index: u32) {
        let sent = c.result.max(0) as usize;
        if c.result > 0 {
            self.stats()
                .bytes_out
                .fetch_add(sent as u64, Ordering::Relaxed);
        }
        let (key, generation) = match self.driver.ring.send_done(index, sent) {
            None => return,
            Some(SendDone::Partial { key, generation }) => {
                // Only the same connection may get the rest: a
                // dropped one's slot may already hold a new one.
                if self.live(key, generation) {
                    self.driver.ring.resend(index);
                } else {
                    self.driver.ring.abandon(index);
                }
                return;
            }
            Some(SendDone::Finished { key, generation }) => (key, generation),
        };
        if !self.live(key, generation) {
            return;
        }
        self.conns[key as usize].set_sending(false);
        if c.result < 0 {
            self.lost(key);
        } else {
            self.flush(key);
            self.apply_actions();
        }
    }
}
