//! The I/O layer every event loop stands on: the controller's shards, the
//! agent/swarm worker and the chained relay. Each of them owns a private fd
//! table, opens non-blocking sockets, sends and receives until the socket
//! would block, names its sockets with (key, generation) tokens, and starts
//! its threads only once each has said it is ready. Those steps live here,
//! once, so a fix for EINTR, an fd leak or a start race is made in one place.
//!
//! Owns no policy: budgets (how many reads before the others' turn), what a
//! byte means, and when to give up are the loops'. Never blocks.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use socket2::{Domain, Socket, Type};

use super::sys;

/// An epoll token for one socket of a slab entry: its key and generation
/// (a reused slot has a new generation, so a stale event is recognised).
pub fn token(key: u32, generation: u32) -> u64 {
    (generation as u64) << 32 | key as u64
}

/// The (key, generation) a `token` names.
pub fn untoken(token: u64) -> (u32, u32) {
    (token as u32, (token >> 32) as u32)
}

/// Takes this thread's own fd table and keeps only the fds named in `keep`
/// (plus stdio): copies of other threads' sockets would otherwise stay open
/// here and keep those sockets alive after their owners close them.
pub fn own_fd_table(keep: &[RawFd]) -> std::io::Result<()> {
    sys::unshare_fd_table()?;
    for fd in sys::open_fds()? {
        if fd > 2 && !keep.contains(&fd) {
            sys::close(fd);
        }
    }
    Ok(())
}

/// A connected socket's peer address, with an IPv4-mapped IPv6 address
/// unwrapped (`::ffff:10.0.0.7` is `10.0.0.7`).
pub fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the caller owns `fd` for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let addr = socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Starts a non-blocking TCP connect to `addr`, from `source` if given (and
/// of the same family; IPv4 sources bind without taking a port until the
/// connect, so many sources share the ephemeral range). Nagle is off.
pub fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<RawFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        if ip.is_ipv4() {
            let _ = sys::set_bind_address_no_port(fd);
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into_raw_fd())
}

/// The peer is gone (reset, broken pipe, or another socket error).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Gone;

/// Sends as much of `bytes` as the socket takes now; returns how much.
/// Interrupted sends are retried.
pub fn send_some(fd: RawFd, bytes: &[u8]) -> Result<usize, Gone> {
    let mut sent = 0;
    while sent < bytes.len() {
        match sys::send(fd, &bytes[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(Gone),
        }
    }
    Ok(sent)
}

/// What one receive found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes, at the start of the buffer.
    Data(usize),
    /// Nothing more for now (EAGAIN).
    Drained,
    /// The peer shut its side (EOF) or the socket failed.
    Gone,
}

/// One receive into `buf`; interrupted receives are retried.
pub fn recv_some(fd: RawFd, buf: &mut [u8]) -> Received {
    loop {
        match sys::recv(fd, buf) {
            Ok(0) => return Received::Gone,
            Ok(n) => return Received::Data(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Received::Drained,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Received::Gone,
        }
    }
}

/// Reads from one socket per readiness event before the others' turn:
/// the shards', the worker's and the relay's loops all stop at it.
pub const READ_BUDGET: usize = 16;

/// Sockets whose read budget ran out with data possibly left. Edge-
/// triggered epoll will not report them again, so the loop reads them on
/// its next turn, before it sleeps (and does not sleep while any wait).
#[derive(Default)]
pub struct ReadAgain {
    pending: Vec<u64>,
}

impl ReadAgain {
    /// Read the socket with this token again next turn.
    pub fn defer(&mut self, token: u64) {
        self.pending.push(token);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// This turn's tokens; those deferred while handling them wait for the
    /// next turn.
    pub fn take(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending)
    }
}

/// What one accept found.
#[derive(Debug)]
pub enum Accepted {
    /// A socket, and its peer if the kernel told it.
    Socket(RawFd, Option<std::net::SocketAddr>),
    /// The backlog is empty.
    Drained,
    /// EMFILE, ENFILE, ENOBUFS…: the backlog keeps the connections; try
    /// again when room frees.
    Failed(std::io::Error),
}

/// Accepts one connection (Nagle off). Interruptions and connections that
/// were reset while queued are skipped.
pub fn accept_one(listener: RawFd) -> Accepted {
    loop {
        match sys::accept(listener) {
            Ok((fd, peer)) => {
                let _ = sys::set_nodelay(fd);
                return Accepted::Socket(fd, peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Accepted::Drained,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Accepted::Failed(e),
        }
    }
}

/// Which thread of a `StartGroup` failed to start, and why.
pub type StartFailure = (usize, String);

/// What a thread of a `StartGroup` tells its starter, once.
pub struct Ready {
    index: usize,
    tx: Sender<(usize, Result<(), String>)>,
}

impl Ready {
    /// Set up: the starter may go on.
    pub fn ok(self) {
        let _ = self.tx.send((self.index, Ok(())));
    }

    /// Could not set up, and why: the start fails with this.
    pub fn fail(self, why: impl std::fmt::Display) {
        let _ = self.tx.send((self.index, Err(why.to_string())));
    }

    /// Reports how `setup` went, and on success runs the loop with it.
    pub fn then_run<T, E: std::fmt::Display>(self, setup: Result<T, E>, run: impl FnOnce(T)) {
        match setup {
            Ok(state) => {
                self.ok();
                run(state);
            }
            Err(e) => self.fail(e),
        }
    }
}

/// Threads started together: each runs its own setup (its fd table, its
/// event loop) and reports `Ready` before its loop runs; `wait` returns
/// once all have, or one failed. A thread that ends without a word counts
/// as failed, so `wait` never hangs.
pub struct StartGroup {
    tx: Sender<(usize, Result<(), String>)>,
    rx: Receiver<(usize, Result<(), String>)>,
    threads: Vec<JoinHandle<()>>,
    started: usize,
    failure: Option<(usize, String)>,
}

impl Default for StartGroup {
    fn default() -> Self {
        let (tx, rx) = channel();
        StartGroup {
            tx,
            rx,
            threads: Vec::new(),
            started: 0,
            failure: None,
        }
    }
}

impl StartGroup {
    /// Starts thread number `self.len()` named `name`.
    pub fn spawn(&mut self, name: String, body: impl FnOnce(Ready) + Send + 'static) {
        let index = self.started;
        self.started += 1;
        let ready = Ready {
            index,
            tx: self.tx.clone(),
        };
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || body(ready))
        {
            Ok(t) => self.threads.push(t),
            Err(e) => {
                self.failure
                    .get_or_insert((index, format!("cannot spawn its thread: {e}")));
            }
        }
    }

    /// Waits for every thread's word. On failure the threads that did start
    /// are returned too (they must be stopped and joined by the caller).
    pub fn wait(self) -> (Vec<JoinHandle<()>>, Result<(), StartFailure>) {
        let StartGroup {
            tx,
            rx,
            threads,
            started,
            mut failure,
        } = self;
        drop(tx);
        let spawned = threads.len();
        let mut heard = vec![false; started];
        for _ in 0..spawned {
            match rx.recv() {
                Ok((index, Ok(()))) => heard[index] = true,
                Ok((index, Err(why))) => {
                    heard[index] = true;
                    failure.get_or_insert((index, why));
                }
                Err(_) => {
                    // Name the first thread that never said a word.
                    let silent = heard.iter().position(|h| !h).unwrap_or(0);
                    failure.get_or_insert((silent, "its thread exited during start".into()));
                    break;
                }
            }
        }
        (threads, failure.map_or(Ok(()), Err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for (key, generation) in [(0, 1), (7, u32::MAX), (u32::MAX, 0)] {
            assert_eq!(untoken(token(key, generation)), (key, generation));
        }
    }

    #[test]
    fn a_start_group_reports_the_first_failure_and_never_hangs() {
        let mut group = StartGroup::default();
        group.spawn("ok".into(), |ready| ready.ok());
        group.spawn("fails".into(), |ready| ready.fail("no fd table"));
        // Ends without a word (a panic in setup, say): must not hang.
        group.spawn("silent".into(), drop);
        let (threads, result) = group.wait();
        assert_eq!(threads.len(), 3);
        let (index, why) = result.unwrap_err();
        assert_eq!((index, why.as_str()), (1, "no fd table"));
        threads.into_iter().for_each(|t| t.join().unwrap());

        // Only a silent thread: it is named, not a thread that never existed.
        let mut group = StartGroup::default();
        group.spawn("ok".into(), |ready| ready.ok());
        group.spawn("silent".into(), drop);
        let (threads, result) = group.wait();
        assert_eq!(result.unwrap_err().0, 1);
        threads.into_iter().for_each(|t| t.join().unwrap());

        let mut group = StartGroup::default();
        for i in 0..4 {
            group.spawn(format!("t{i}"), |ready| ready.ok());
        }
        let (threads, result) = group.wait();
        assert_eq!((threads.len(), result), (4, Ok(())));
    }

    #[test]
    fn send_and_receive_until_the_socket_would_block() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = connect_from(addr, Some("127.0.0.1".parse().unwrap())).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = server.into_raw_fd();
        let mut buf = [0u8; 64];
        assert_eq!(recv_some(server, &mut buf), Received::Drained);
        // The connect may still be in progress: wait until it takes bytes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while send_some(client, b"hello") != Ok(5) {
            assert!(
                std::time::Instant::now() < deadline,
                "connect never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match recv_some(server, &mut buf) {
                Received::Data(n) => {
                    assert_eq!(&buf[..n], b"hello");
                    break;
                }
                Received::Drained if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                other => panic!("{other:?}"),
            }
        }
        sys::close(client);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while recv_some(server, &mut buf) != Received::Gone {
            assert!(std::time::Instant::now() < deadline, "EOF never came");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sys::close(server);
    }
}
