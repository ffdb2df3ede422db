//! Listening sockets: one per shard on the same address with SO_REUSEPORT,
//! so the kernel spreads new connections over the shards.
//!
//! All listeners are opened by the starting thread, before any shard
//! unshares its fd table, so a bad address or a port in use is reported
//! once, synchronously, with a clear message.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// The backlog asked for; the kernel caps it at net.core.somaxconn.
pub const BACKLOG: i32 = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{addr} is already in use (another process, or another tether, listens there); stop it or pass --listen with another port"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Other { addr: SocketAddr, source: io::Error },
}

fn socket_for(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` serves IPv4 too (dual stack).
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    Ok(socket)
}

fn classify(addr: SocketAddr, source: io::Error) -> ListenError {
    if source.kind() == io::ErrorKind::AddrInUse {
        ListenError::InUse { addr }
    } else {
        ListenError::Other { addr, source }
    }
}

/// `open_listeners`, but a port in use is tried again for up to `wait`: a
/// process that just exited may hold it a little longer (an io_uring's
/// teardown, which closes its sockets, runs after the process is gone), so
/// a restart right after a crash still binds.
pub fn open_listeners_waiting(
    addr: SocketAddr,
    count: usize,
    wait: std::time::Duration,
) -> Result<(Vec<RawFd>, SocketAddr), ListenError> {
    let deadline = std::time::Instant::now() + wait;
    let mut warned = false;
    loop {
        match open_listeners(addr, count) {
            Err(ListenError::InUse { .. }) if std::time::Instant::now() < deadline => {
                if !warned {
                    warned = true;
                    tracing::warn!(
                        "{addr} is in use; trying again for up to {} (a process that just exited may still hold it)",
                        humantime::format_duration(wait)
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Opens `count` SO_REUSEPORT listeners on `addr` and returns their raw fds
/// (owned by the caller) and the bound address (the real port when `addr`
/// asked for port 0).
pub fn open_listeners(
    addr: SocketAddr,
    count: usize,
) -> Result<(Vec<RawFd>, SocketAddr), ListenError> {
    assert!(count > 0, "at least one listener");
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(count);
    let result = (0..count).try_for_each(|_| {
        let socket = socket_for(bound, true)?;
        socket.bind(&bound.into())?;
        if bound.port() == 0 {
            bound = socket.local_addr()?.as_socket().expect("inet socket");
        }
        sockets.push(socket);
        Ok(())
    });
    if let Err(e) = result {
        return Err(classify(bound, e));
    }
    // Bound with SO_REUSEPORT, they would silently join another group
    // listening there. They listen only once none is: a bound socket takes
    // no connections, so none of the other group's is lost meanwhile.
    if addr.port() != 0 && others_listen(bound, &sockets)? {
        return Err(ListenError::InUse { addr });
    }
    // All listen before any is handed over as a raw fd, so an error drops
    // (closes) every one.
    for socket in &sockets {
        socket.listen(BACKLOG).map_err(|e| classify(bound, e))?;
    }
    let fds = sockets
        .into_iter()
        .map(|s| TcpListener::from(s).into_raw_fd())
        .collect();
    Ok((fds, bound))
}

/// Whether a socket other than `ours` listens on `addr`'s port at an
/// address that overlaps it (the same, or either a wildcard).
///
/// The kernel is asked with sock_diag for its TCP listeners only, which
/// it keeps apart. (A probe bind without SO_REUSEPORT, the obvious test,
/// walks every socket that holds the port: after a crash under 300k
/// services that is the dead process's 300k closing sockets, and it took
/// 1.1 s, then as long again for the next bind, whose fast path the probe
/// had turned off.) Where sock_diag is not available, the probe it is.
fn others_listen(addr: SocketAddr, ours: &[Socket]) -> Result<bool, ListenError> {
    let mut inodes = Vec::with_capacity(ours.len());
    for socket in ours {
        use std::os::fd::AsRawFd;
        // SAFETY: fstat fills the struct it is given, on our own fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(socket.as_raw_fd(), &mut st) } != 0 {
            return probe(addr);
        }
        inodes.push(st.st_ino);
    }
    let listeners = match super::sys::tcp_listeners() {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("sock_diag: {e}; probing {addr} with a bind instead");
            return probe(addr);
        }
    };
    let overlaps = |other: &SocketAddr| {
        let canonical = |ip: std::net::IpAddr| ip.to_canonical();
        other.port() == addr.port()
            && (other.ip().is_unspecified()
                || addr.ip().is_unspecified()
                || canonical(other.ip()) == canonical(addr.ip()))
    };
    Ok(listeners
        .iter()
        .any(|(other, inode)| overlaps(other) && !inodes.contains(&u64::from(*inode))))
}

/// A bind without SO_REUSEPORT fails if anybody listens there (our own
/// sockets are not listening yet).
fn probe(addr: SocketAddr) -> Result<bool, ListenError> {
    let probe = socket_for(addr, false).map_err(|e| classify(addr, e))?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(classify(addr, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gives_every_listener_the_same_real_port() {
        let (fds, addr) = open_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(fds.len(), 3);
        // A second group on the same port is refused, not joined.
        match open_listeners(addr, 1) {
            Err(ListenError::InUse { .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
        fds.into_iter().for_each(crate::engine::sys::close);
    }

    /// A plain listener (no SO_REUSEPORT) of another program, on the same
    /// address or the wildcard, is seen too, and a port nobody listens on
    /// is free however many sockets are bound there without listening.
    #[test]
    fn another_program_s_listener_is_seen_and_a_free_port_is_free() {
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let listed = crate::engine::sys::tcp_listeners().unwrap();
        assert!(listed.iter().any(|(a, _)| *a == addr), "{listed:?}");
        match open_listeners(addr, 2) {
            Err(ListenError::InUse { .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
        let wildcard = SocketAddr::new("0.0.0.0".parse().unwrap(), addr.port());
        assert!(matches!(
            open_listeners(wildcard, 1),
            Err(ListenError::InUse { .. })
        ));
        drop(other);
        let (fds, bound) = open_listeners(addr, 2).unwrap();
        assert_eq!(bound, addr);
        fds.into_iter().for_each(crate::engine::sys::close);
    }
}
