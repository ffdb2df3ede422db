//! The io_uring facility for one shard: a ring, a provided-buffer ring for
//! receives, a bounded pool of send buffers, and the encoding of each
//! operation's user_data. No policy: what a completion means is the
//! shard's business (`shard/uring_loop.rs`).
//!
//! Sockets are direct descriptors (accepted, by a few one-shot accepts
//! kept armed, with IORING_FILE_INDEX_ALLOC into a sparse table, used as `Fixed`, closed through the ring): they
//! never appear in an fd table. Receives are multishot and take their
//! buffer from the ring's buffer group only when data arrives, so an idle
//! connection owns no buffer. Kernel >= 6.0 (multishot recv); `probe`
//! says whether this one will do.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{self, BufRingEntry, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};

/// The size of a provided receive buffer. The default count
/// (`EngineConfig::uring_recv_buffers`, 512 × 2 KiB = 1 MiB per shard) is
/// touched once at start; every receive takes one only while its data is
/// being processed.
pub const RECV_BUFFER_SIZE: usize = 2048;
/// Send buffers kept for reuse; more are allocated and freed as needed.
const SEND_POOL: usize = 256;
/// A pooled send buffer's capacity; larger sends get their own.
const SEND_BUFFER_SIZE: usize = 4096;
/// Sends up to this size (pings and pongs, plain or sealed; close frames)
/// take a small buffer of their own class. A tick pings hundreds of
/// connections at once: at 4 KiB each, that burst left megabytes of freed
/// buffers in the allocator's pages (480 B more RSS per service with 1 s
/// pings at 50,000 services).
const SMALL_SEND: usize = 128;
/// Small buffers kept for reuse (a tick's burst of pings reuses them).
const SMALL_POOL: usize = 1024;
/// The most one send takes in flight: the rest of a connection's output
/// waits, counted, in its own queue (so a slow reader holds at most this
/// much outside the shard's accounting of queued bytes).
pub const MAX_SEND: usize = 64 << 10;
const BUFFER_GROUP: u16 = 7;

/// What a completion is for: the top 8 bits of its user_data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// An accept: its index among the accepts kept armed.
    Accept(u32),
    /// A connection's multishot receive: (slab key, generation low 24 bits).
    Recv(u32, u32),
    /// A send: its index in the send table.
    Send(u32),
    /// Shutdown and socket options: nothing to do on completion.
    Quiet,
    /// A write-side shutdown of a slot (its close waits for it).
    ShutWr(u32),
    Mailbox,
    /// A slot's close (counted until done: teardown waits for them).
    Closed,
    /// A direct descriptor installed into the fd table (waited for).
    Install,
    /// The listener may have connections waiting (a poll of the epoll
    /// instance that watches it).
    Listener,
}

impl Op {
    pub fn encode(self) -> u64 {
        match self {
            Op::Accept(index) => 1 << 56 | index as u64,
            Op::Recv(key, generation) => {
                2 << 56 | ((generation & 0xFF_FFFF) as u64) << 32 | key as u64
            }
            Op::Send(index) => 3 << 56 | index as u64,
            Op::Quiet => 4 << 56,
            Op::Mailbox => 5 << 56,
            Op::Closed => 6 << 56,
            Op::Install => 7 << 56,
            Op::ShutWr(slot) => 8 << 56 | slot as u64,
            Op::Listener => 9 << 56,
        }
    }

    pub fn decode(user_data: u64) -> Option<Op> {
        let low = user_data as u32;
        Some(match user_data >> 56 {
            1 => Op::Accept(low),
            2 => Op::Recv(low, ((user_data >> 32) & 0xFF_FFFF) as u32),
            3 => Op::Send(low),
            4 => Op::Quiet,
            5 => Op::Mailbox,
            6 => Op::Closed,
            7 => Op::Install,
            8 => Op::ShutWr(low),
            9 => Op::Listener,
            _ => return None,
        })
    }
}

/// One completion, copied out of the ring.
#[derive(Copy, Clone, Debug)]
pub struct Completion {
    pub op: Option<Op>,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// Whether this kernel has what the driver needs; `Err` says what is missing.
///
/// Runs on a thread of its own: a thread that set up a ring later gets the
/// ring's teardown as task work with a notify-signal, which interrupts
/// whatever blocking call it is in then (EINTR, with no signal to see).
pub fn probe() -> Result<(), String> {
    std::thread::Builder::new()
        .name("tether-uring-probe".into())
        .spawn(probe_here)
        .map_err(|e| format!("cannot start the probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the probe panicked".into()))
}

fn probe_here() -> Result<(), String> {
    let ring: IoUring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    if !ring.params().is_feature_ext_arg() {
        return Err("the kernel lacks IORING_FEAT_EXT_ARG (timeouts on wait)".into());
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe io_uring: {e}"))?;
    // Multishot recv and accept into direct slots share opcodes with their
    // one-shot forms; SendZc arrived in the same release (6.0).
    for (name, code) in [
        ("accept", opcode::AcceptMulti::CODE),
        ("recv", opcode::RecvMulti::CODE),
        ("send_zc (kernel 6.0)", opcode::SendZc::CODE),
        ("close", opcode::Close::CODE),
        ("shutdown", opcode::Shutdown::CODE),
        ("poll_add", opcode::PollAdd::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks {name}"));
        }
    }
    Ok(())
}

/// The provided-buffer ring: entries the kernel takes buffers from, and
/// the buffers. Both are one anonymous mapping, so they are page-aligned
/// and stay put.
struct BufRing {
    /// Do not unmap on drop (requests may still use the buffers).
    leak: bool,
    count: u16,
    map: *mut u8,
    map_len: usize,
    entries: *mut BufRingEntry,
    buffers: *mut u8,
    mask: u16,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring, buffers: u16) -> io::Result<BufRing> {
        assert!(buffers.is_power_of_two(), "validated by EngineConfig");
        let count = buffers as usize;
        let ring_bytes = (count * size_of::<BufRingEntry>()).next_multiple_of(4096);
        let map_len = ring_bytes + count * RECV_BUFFER_SIZE;
        // SAFETY: an anonymous private mapping; we own it until Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = map.cast::<u8>();
        let mut buf_ring = BufRing {
            leak: false,
            count: buffers,
            map,
            map_len,
            entries: map.cast(),
            // SAFETY: within the mapping (ring_bytes < map_len).
            buffers: unsafe { map.add(ring_bytes) },
            mask: buffers - 1,
            tail: 0,
        };
        // SAFETY: the ring memory is page-aligned and sized for `buffers`
        // entries; it stays mapped while any request can select from it
        // (see the drops below).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(map as u64, buffers, BUFFER_GROUP, 0)?;
        }
        for bid in 0..buffers {
            buf_ring.push(bid);
        }
        buf_ring.publish();
        Ok(buf_ring)
    }

    /// Returns buffer `bid` to the kernel (visible after `publish`).
    fn push(&mut self, bid: u16) {
        let index = (self.tail & self.mask) as usize;
        // SAFETY: index < count entries; bid < count buffers (both masked
        // or checked by the callers).
        unsafe {
            let entry = &mut *self.entries.add(index);
            entry.set_addr(self.buffers.add(bid as usize * RECV_BUFFER_SIZE) as u64);
            entry.set_len(RECV_BUFFER_SIZE as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail is the u16 at offset 14 of entry 0, which the
        // kernel reads atomically; Release orders the entries before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries as *const BufRingEntry) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn take(&self, bid: u16, len: usize) -> RecvBuf {
        assert!(
            bid < self.count && len <= RECV_BUFFER_SIZE,
            "the kernel gave a buffer we do not have"
        );
        // SAFETY: in bounds (checked above).
        RecvBuf {
            ptr: unsafe { self.buffers.add(bid as usize * RECV_BUFFER_SIZE) },
            len,
            bid,
        }
    }
}

/// A receive buffer the kernel filled and handed over: ours until it goes
/// back with `Uring::recycle` (which consumes it).
pub struct RecvBuf {
    ptr: *mut u8,
    len: usize,
    bid: u16,
}

impl RecvBuf {
    pub fn data(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` lies in the buffer ring's mapping, which
        // lives as long as the shard's `Uring`; the kernel does not write a
        // completed buffer until it is pushed back, and pushing back
        // consumes this handle.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leak {
            // Requests may still be in the kernel (teardown timed out): a
            // receive could still write into these buffers, so they stay.
            return;
        }
        // SAFETY: unmaps what `new` mapped. No request of ours is in the
        // kernel (`Uring` checked it is quiescent, else set `leak`), so
        // nothing selects or writes these buffers any more.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if !self.quiescent() {
            tracing::warn!(
                "io_uring torn down with requests in flight; keeping its buffers mapped"
            );
            self.buffers.leak = true;
            // Send buffers may still be read by the kernel: keep them too.
            for (_, s) in std::mem::take(&mut self.sends) {
                std::mem::forget(s.buf);
            }
            // An accept still armed may write its peer's address.
            std::mem::forget(std::mem::take(&mut self.accepts));
        }
    }
}

/// What a send completion leaves to do.
#[derive(Debug, PartialEq, Eq)]
pub enum SendDone {
    /// All of it went out (or it failed); the buffer is back in the pool.
    Finished { key: u32, generation: u32 },
    /// Part of it went out: `resend` if the connection is still the same
    /// one, else `abandon` (its slot may belong to a new connection now).
    Partial { key: u32, generation: u32 },
}

/// A send in flight: its buffer must live until the completion.
pub struct Sending {
    pub key: u32,
    pub generation: u32,
    pub slot: u32,
    pub buf: Vec<u8>,
    pub offset: usize,
}

/// One-shot accepts a shard submits at once: up to this many connections
/// are taken per submission.
const ACCEPTS: usize = 16;

/// `IORING_ACCEPT_DONTWAIT` (kernel 6.10), in an accept's `ioprio`: with
/// no connection waiting the accept completes at once with -EAGAIN
/// instead of waiting in the kernel.
const ACCEPT_DONTWAIT: u16 = 1 << 1;

/// With accepts that do not wait, how often the listener is tried even
/// without a readiness event (a safety net; each try is one submission).
const ACCEPT_PROBE: Duration = Duration::from_secs(1);

/// What an accept's completion amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A connection, in this direct slot, from this peer.
    Socket(u32, Option<SocketAddr>),
    /// None: no connection was waiting, or the accept was cancelled.
    Nothing,
    /// An error (the errno).
    Failed(i32),
}

#[derive(Copy, Clone, PartialEq, Eq, Default)]
enum AcceptState {
    #[default]
    Free,
    Armed,
    /// Completed and reaped, not yet handled: its address is still unread.
    Done,
}

struct Accepting {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    state: AcceptState,
}

impl Default for Accepting {
    fn default() -> Accepting {
        Accepting {
            // SAFETY: zeroed sockaddr_storage is a valid (empty) address.
            addr: unsafe { std::mem::zeroed() },
            len: 0,
            state: AcceptState::Free,
        }
    }
}

/// One shard's ring.
pub struct Uring {
    ring: IoUring,
    buffers: BufRing,
    sends: slab::Slab<Sending>,
    pool: Vec<Vec<u8>>,
    /// Buffers of `SMALL_SEND` bytes.
    small: Vec<Vec<u8>>,
    recycled: bool,
    /// Completions reaped while making room in a full queue.
    deferred: Vec<Completion>,
    /// Bytes held by sends in flight (their buffers' capacity).
    in_flight: usize,
    /// One-shot accepts kept armed, each with the buffer its peer's
    /// address is written to (boxed: the kernel holds the pointers).
    accepts: Box<[Accepting]>,
    /// The listener's readiness, told by an epoll instance that watches
    /// it (None: accepts wait in the kernel, as before kernel 6.10).
    listening: Option<Listening>,
    /// Slots with a write-side shutdown in flight: how many, and whether
    /// the slot's close waits for them.
    shutting: HashMap<u32, Shutting>,
    // What is in the kernel: teardown waits until none is.
    armed_recvs: usize,
    closing: usize,
}

/// Accepts that do not wait. A request in the kernel holds a reference
/// to its listener, and after a crash the kernel ends a ring's requests
/// in the background, late at scale (seconds at 100,000 connections):
/// the dead process's listener kept its port (a restart could not bind)
/// and took connections into a queue nobody accepts from. So no accept
/// stays in the kernel: an epoll instance (which holds no reference)
/// watches the listener, a multishot poll of it says when connections
/// wait, and the accepts submitted then complete during the submission.
struct Listening {
    epoll: super::epoll::Epoll,
    /// Connections may be waiting: accept at the next chance.
    ready: bool,
    /// The last accepts submitted, for the periodic try.
    last_try: std::time::Instant,
    /// How many accepts to have in flight.
    window: AcceptWindow,
}

/// How many accepts that do not wait to have in flight. Each that finds
/// the queue empty costs a submission, an attempt on the listener and a
/// completion for nothing: 16 at every readiness, with connections coming
/// one at a time (10,000/s over 20 shards), was 12 accepts per connection
/// at 300,000 services. The window is the run of connections just taken
/// (halved by every accept that found none), at least 1: a trickle costs
/// one accept that finds nothing per connection, as epoll's drain to
/// EAGAIN does, and in a herd the window doubles every round to 16.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct AcceptWindow(usize);

impl AcceptWindow {
    fn size(self) -> usize {
        self.0.clamp(1, ACCEPTS)
    }

    /// An accept took a connection.
    fn taken(&mut self) {
        self.0 = (self.0 + 1).min(ACCEPTS);
    }

    /// An accept found the queue empty.
    fn empty(&mut self) {
        self.0 /= 2;
    }
}

#[derive(Default)]
struct Shutting {
    in_flight: u32,
    close: bool,
}

impl Uring {
    /// A ring for a shard holding up to `slots` direct descriptors, with
    /// `buffers` provided receive buffers (a power of two).
    pub fn new(slots: u32, buffers: u16) -> io::Result<Uring> {
        let ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(16_384)
            .build(4096)?;
        ring.submitter().register_files_sparse(slots)?;
        let buffers = BufRing::new(&ring, buffers)?;
        Ok(Uring {
            ring,
            buffers,
            sends: slab::Slab::with_capacity(1024),
            pool: Vec::new(),
            small: Vec::new(),
            recycled: false,
            deferred: Vec::new(),
            in_flight: 0,
            accepts: (0..ACCEPTS).map(|_| Accepting::default()).collect(),
            listening: None,
            shutting: HashMap::new(),
            armed_recvs: 0,
            closing: 0,
        })
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every pointer an entry carries (send buffers) stays valid
        // until its completion: send buffers live in `self.sends` until then.
        unsafe {
            while self.ring.submission().push(&entry).is_err() {
                // Full: hand what is queued to the kernel. If it is busy
                // because completions are backed up, reap them (they are
                // handled at the next `wait`) and try again.
                match self.ring.submit() {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                    Err(e) => tracing::error!("io_uring submit failed: {e}"),
                    Ok(_) => {}
                }
            }
        }
    }

    /// Copies completions out of the ring, keeping count of what is still
    /// in the kernel.
    fn reap(&mut self) {
        let (mut recvs_ended, mut closes_done) = (0, 0);
        let accepts = &mut self.accepts;
        let reaped = self.ring.completion().map(|c| {
            let done = Completion {
                op: Op::decode(c.user_data()),
                result: c.result(),
                flags: c.flags(),
            };
            match done.op {
                Some(Op::Recv(..)) if !done.more() => recvs_ended += 1,
                Some(Op::Closed) => closes_done += 1,
                // Out of the kernel; its address is read when handled.
                Some(Op::Accept(i)) => accepts[i as usize].state = AcceptState::Done,
                _ => {}
            }
            done
        });
        self.deferred.extend(reaped);
        self.armed_recvs -= recvs_ended;
        self.closing -= closes_done;
    }

    /// Watches `listener` for connections waiting, so that accepts need
    /// not wait in the kernel (see `Listening`). If that cannot be set up,
    /// accepts wait in the kernel.
    pub fn listen(&mut self, listener: RawFd) {
        let epoll = match super::epoll::Epoll::new(1) {
            Ok(epoll) => epoll,
            Err(e) => {
                tracing::warn!(
                    "cannot watch the listener with epoll ({e}): accepts wait in the kernel"
                );
                return;
            }
        };
        // Level-triggered: the instance stays readable while any wait.
        if let Err(e) = epoll.add(listener, super::epoll::READABLE, 0) {
            tracing::warn!(
                "cannot watch the listener with epoll ({e}): accepts wait in the kernel"
            );
            return;
        }
        self.watch_listener(epoll.as_raw_fd());
        self.listening = Some(Listening {
            epoll,
            ready: true,
            last_try: std::time::Instant::now(),
            window: AcceptWindow::default(),
        });
    }

    fn watch_listener(&mut self, epoll: RawFd) {
        let entry = opcode::PollAdd::new(Fd(epoll), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.push(entry.user_data(Op::Listener.encode()));
    }

    /// The listener's poll completed: connections wait (and the poll,
    /// if it ended, is armed again).
    pub fn listener_ready(&mut self, c: &Completion) {
        let Some(listening) = &mut self.listening else {
            return;
        };
        listening.ready = true;
        if !c.more() {
            let fd = listening.epoll.as_raw_fd();
            self.watch_listener(fd);
        }
    }

    /// Submits accepts on `listener`, each into a free direct slot: all
    /// of them when accepts wait in the kernel, else as many as the
    /// window says (counting those in flight) when connections may be
    /// waiting (or a second has passed). One-shot
    /// accepts (not multishot) so that each tells its peer's address, for
    /// the per-source limits, without a system call.
    pub fn accept(&mut self, listener: RawFd) {
        let (ioprio, window) = match &mut self.listening {
            None => (0, ACCEPTS),
            Some(listening) => {
                if !listening.ready && listening.last_try.elapsed() < ACCEPT_PROBE {
                    return;
                }
                listening.last_try = std::time::Instant::now();
                (ACCEPT_DONTWAIT, listening.window.size())
            }
        };
        let armed = self
            .accepts
            .iter()
            .filter(|a| a.state == AcceptState::Armed);
        let mut room = window.saturating_sub(armed.count());
        for index in 0..self.accepts.len() {
            let accepting = &mut self.accepts[index];
            if accepting.state != AcceptState::Free {
                continue;
            }
            if room == 0 {
                break;
            }
            room -= 1;
            accepting.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            accepting.state = AcceptState::Armed;
            let entry = opcode::Accept::new(
                Fd(listener),
                (&raw mut accepting.addr).cast(),
                &raw mut accepting.len,
            )
            .file_index(Some(types::DestinationSlot::auto_target()))
            .build();
            let entry = with_ioprio(entry, ioprio);
            // SAFETY (of the pointers): `accepts` is boxed and never
            // resized, and this entry is not armed again until its
            // completion was handled (`accepted`).
            self.push(entry.user_data(Op::Accept(index as u32).encode()));
        }
    }

    /// Accept `index` completed with `result`: a socket (and the peer's
    /// address it wrote), nothing, or an error. Frees it to be armed again.
    pub fn accepted(&mut self, index: u32, result: i32) -> Accepted {
        let Some(accepting) = self.accepts.get_mut(index as usize) else {
            return Accepted::Nothing;
        };
        accepting.state = AcceptState::Free;
        if result >= 0 {
            let peer = super::sys::socket_addr(accepting.addr, accepting.len);
            // A socket taken: more may wait.
            if let Some(listening) = &mut self.listening {
                listening.ready = true;
                listening.window.taken();
            }
            return Accepted::Socket(result as u32, peer);
        }
        match (-result, &mut self.listening) {
            (libc::EAGAIN, Some(listening)) => {
                // Completions come in order: a connection that arrives
                // after this was found empty is told by a later poll.
                listening.ready = false;
                listening.window.empty();
                Accepted::Nothing
            }
            (libc::EAGAIN | libc::ECANCELED, _) => Accepted::Nothing,
            (libc::EINVAL, Some(_)) => {
                // A kernel before 6.10: accepts wait in the kernel.
                tracing::info!(
                    "this kernel's io_uring accepts cannot be told not to wait (6.10): they wait in the kernel, and a crashed controller's port stays taken until its ring is torn down"
                );
                self.listening = None;
                Accepted::Nothing
            }
            (errno, _) => Accepted::Failed(errno),
        }
    }

    /// An accept is in the kernel.
    pub fn accept_armed(&self) -> bool {
        self.accepts.iter().any(|a| a.state == AcceptState::Armed)
    }

    /// Ends the accepts in the kernel (each completes with -ECANCELED, or
    /// with the socket it took just before).
    pub fn cancel_accept(&mut self) {
        for index in 0..self.accepts.len() {
            if self.accepts[index].state == AcceptState::Armed {
                let user_data = Op::Accept(index as u32).encode();
                let entry = opcode::AsyncCancel::new(user_data).build();
                self.push(entry.user_data(Op::Quiet.encode()));
            }
        }
    }

    pub fn recv(&mut self, slot: u32, key: u32, generation: u32) {
        let entry = opcode::RecvMulti::new(Fixed(slot), BUFFER_GROUP).build();
        self.push(entry.user_data(Op::Recv(key, generation).encode()));
        self.armed_recvs += 1;
    }

    pub fn watch(&mut self, fd: RawFd) {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.push(entry.user_data(Op::Mailbox.encode()));
    }

    /// Sets TCP_NODELAY on a direct descriptor (kernel 6.7; a failure only
    /// costs latency, so it is not checked).
    pub fn nodelay(&mut self, slot: u32) {
        static ONE: libc::c_int = 1;
        let entry = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&ONE as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
        .build();
        self.push(entry.user_data(Op::Quiet.encode()));
    }

    /// Installs direct descriptor `slot` into the thread's fd table
    /// (IORING_OP_FIXED_FD_INSTALL, kernel 6.8) and waits for it: it
    /// completes inline, so the wait is one `io_uring_enter`. Completions
    /// reaped meanwhile are kept for the next `wait`. The returned fd is a
    /// second reference to the socket, for calls that need a plain fd.
    pub fn install(&mut self, slot: u32) -> io::Result<OwnedFd> {
        let entry = opcode::FixedFdInstall::new(Fixed(slot), 0).build();
        self.push(entry.user_data(Op::Install.encode()));
        for _ in 0..10 {
            self.submit_and_wait(Duration::from_millis(100))?;
            self.reap();
            if let Some(i) = self.deferred.iter().position(|c| c.op == Some(Op::Install)) {
                let done = self.deferred.remove(i);
                if done.result < 0 {
                    return Err(io::Error::from_raw_os_error(-done.result));
                }
                // SAFETY: the kernel just made this fd, and it is ours alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(done.result) });
            }
        }
        // Its completion, if it ever comes, is closed by the shard loop.
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the descriptor install did not complete",
        ))
    }

    /// Starts sending `bytes` on `slot`; the connection is (key, generation).
    pub fn send(&mut self, slot: u32, key: u32, generation: u32, bytes: &[u8]) {
        let mut buf = if bytes.len() <= SMALL_SEND {
            self.small
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(SMALL_SEND))
        } else {
            match self.pool.pop() {
                Some(b) if bytes.len() <= b.capacity() => b,
                other => {
                    if let Some(b) = other {
                        self.pool.push(b);
                    }
                    Vec::with_capacity(bytes.len().max(SEND_BUFFER_SIZE))
                }
            }
        };
        buf.clear();
        buf.extend_from_slice(bytes);
        self.in_flight += buf.capacity();
        let index = self.sends.insert(Sending {
            key,
            generation,
            slot,
            buf,
            offset: 0,
        }) as u32;
        self.submit_send(index);
    }

    fn submit_send(&mut self, index: u32) {
        let s = &self.sends[index as usize];
        let rest = &s.buf[s.offset..];
        let entry = opcode::Send::new(Fixed(s.slot), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push(entry.user_data(Op::Send(index).encode()));
    }

    /// A send completed with `sent` bytes (0 on an error).
    pub fn send_done(&mut self, index: u32, sent: usize) -> Option<SendDone> {
        let s = self.sends.get_mut(index as usize)?;
        s.offset += sent;
        let (key, generation) = (s.key, s.generation);
        if sent > 0 && s.offset < s.buf.len() {
            return Some(SendDone::Partial { key, generation });
        }
        self.abandon(index);
        Some(SendDone::Finished { key, generation })
    }

    /// Sends the rest of a partial send.
    pub fn resend(&mut self, index: u32) {
        self.submit_send(index);
    }

    /// Drops a send (its buffer goes back to the pool).
    pub fn abandon(&mut self, index: u32) {
        let done = self.sends.remove(index as usize);
        self.in_flight -= done.buf.capacity();
        let cap = done.buf.capacity();
        if cap == SMALL_SEND {
            if self.small.len() < SMALL_POOL {
                self.small.push(done.buf);
            }
        } else if self.pool.len() < SEND_POOL && cap <= SEND_BUFFER_SIZE {
            self.pool.push(done.buf);
        }
    }

    /// Sends a FIN on `slot`. A shutdown runs in the kernel's worker
    /// threads and finds its socket by slot only when it runs, which can
    /// be after a close queued later has freed the slot and an accept has
    /// put a new connection in it (the new peer would get our FIN): the
    /// slot's close waits for this to complete (`shutdown_done`).
    pub fn shutdown_write(&mut self, slot: u32) {
        self.shutting.entry(slot).or_default().in_flight += 1;
        let entry = opcode::Shutdown::new(Fixed(slot), libc::SHUT_WR).build();
        self.push(entry.user_data(Op::ShutWr(slot).encode()));
    }

    /// A write-side shutdown of `slot` completed: the slot's close, if it
    /// waited for the last of them, goes now.
    pub fn shutdown_done(&mut self, slot: u32) {
        let Some(shutting) = self.shutting.get_mut(&slot) else {
            return;
        };
        shutting.in_flight -= 1;
        if shutting.in_flight == 0 {
            let close = shutting.close;
            self.shutting.remove(&slot);
            if close {
                self.submit_close(slot);
            }
        }
    }

    /// Releases a socket, once no write-side shutdown of it is in flight
    /// (counted until done either way: teardown waits for it).
    pub fn close(&mut self, slot: u32) {
        self.closing += 1;
        match self.shutting.get_mut(&slot) {
            Some(shutting) => shutting.close = true,
            None => self.submit_close(slot),
        }
    }

    /// A multishot receive holds a reference to the socket, so a bare
    /// close would leave it open (no FIN) until that receive ends: shut it
    /// down first, which ends the receive, then close the slot. Hard
    /// linked, so the close runs even if the shutdown fails (the slot must
    /// come back either way); the close waits for the shutdown, so the
    /// slot still holds this socket when the shutdown looks it up.
    fn submit_close(&mut self, slot: u32) {
        let shutdown = opcode::Shutdown::new(Fixed(slot), libc::SHUT_RDWR)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(Op::Quiet.encode());
        // A link cannot span submissions: room for both first.
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            let _ = self.ring.submit();
        }
        self.push(shutdown);
        let entry = opcode::Close::new(Fixed(slot)).build();
        self.push(entry.user_data(Op::Closed.encode()));
    }

    /// The buffer a receive completion selected, with its `len` bytes.
    pub fn received(&self, bid: u16, len: usize) -> RecvBuf {
        self.buffers.take(bid, len)
    }

    /// Gives a receive buffer back (published at the next `wait`).
    pub fn recycle(&mut self, buf: RecvBuf) {
        self.buffers.push(buf.bid);
        self.recycled = true;
    }

    /// Submits what is queued and waits up to `timeout` for a completion;
    /// then copies the completions out into `into`.
    pub fn wait(&mut self, timeout: Duration, into: &mut Vec<Completion>) -> io::Result<()> {
        if self.recycled {
            self.buffers.publish();
            self.recycled = false;
        }
        // Completions already reaped must not wait behind a timeout.
        let timeout = if self.deferred.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        self.submit_and_wait(timeout)?;
        self.reap();
        into.append(&mut self.deferred);
        Ok(())
    }

    /// Submits what is queued and waits up to `timeout` for a completion;
    /// a timeout, a signal or a full completion queue is no error.
    fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Nothing of ours is in the kernel any more: no receive armed, no
    /// send or close in flight, no accept.
    pub fn quiescent(&self) -> bool {
        self.armed_recvs == 0 && self.closing == 0 && self.sends.is_empty() && !self.accept_armed()
    }

    /// Sends in flight.
    pub fn sending(&self) -> usize {
        self.sends.len()
    }

    /// Bytes the sends in flight hold.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// `entry` with its `ioprio` field (which accept reads its own flags from)
/// set: the builder has no setter for it.
fn with_ioprio(entry: squeue::Entry, ioprio: u16) -> squeue::Entry {
    const _: () = assert!(size_of::<squeue::Entry>() == 64);
    if ioprio == 0 {
        return entry;
    }
    // SAFETY: an `Entry` is the kernel's 64-byte SQE (repr(C)), whose
    // bytes 2..4 are `ioprio` (include/uapi/linux/io_uring.h); any u16 is
    // a valid value there.
    unsafe {
        let mut bytes: [u8; 64] = std::mem::transmute(entry);
        bytes[2..4].copy_from_slice(&ioprio.to_ne_bytes());
        std::mem::transmute::<[u8; 64], squeue::Entry>(bytes)
    }
}

impl AsRawFd for Uring {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [
            Op::Accept(3),
            Op::Recv(7, 0xABCDEF),
            Op::Recv(u32::MAX, 1),
            Op::Send(42),
            Op::Quiet,
            Op::ShutWr(9),
            Op::Mailbox,
            Op::Closed,
            Op::Install,
            Op::Listener,
        ] {
            assert_eq!(Op::decode(op.encode()), Some(op));
        }
        assert_eq!(
            Op::decode(Op::Recv(3, 0x1_000_005).encode()),
            Some(Op::Recv(3, 5)),
            "generation keeps 24 bits"
        );
        assert_eq!(Op::decode(0), None);
    }

    #[test]
    fn the_accept_window_follows_how_many_connections_wait() {
        let mut w = AcceptWindow::default();
        assert_eq!(w.size(), 1);
        // One connection at a time: one accept takes it, the next (armed
        // after it) finds none.
        for _ in 0..10 {
            assert_eq!(w.size(), 1);
            w.taken();
            assert_eq!(w.size(), 1);
            w.empty();
        }
        // A herd: every accept of a round takes one; the window doubles.
        let mut rounds = 0;
        while w.size() < ACCEPTS {
            (0..w.size()).for_each(|_| w.taken());
            rounds += 1;
        }
        assert!(rounds <= 5, "{rounds} rounds to reach {ACCEPTS}");
        w.taken();
        assert_eq!(w.size(), ACCEPTS, "never past the accepts there are");
        // The herd ends: a round of 16 takes 3.
        (0..3).for_each(|_| w.taken());
        (0..13).for_each(|_| w.empty());
        assert_eq!(w.size(), 1);
    }
}
