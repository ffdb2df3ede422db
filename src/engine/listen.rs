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
    // Without SO_REUSEPORT a bind fails if anybody listens there, even
    // another SO_REUSEPORT group we would otherwise silently join.
    if addr.port() != 0 {
        let probe = socket_for(addr, false).map_err(|e| classify(addr, e))?;
        probe.bind(&addr.into()).map_err(|e| classify(addr, e))?;
        drop(probe);
    }
    let mut bound = addr;
    let mut fds = Vec::with_capacity(count);
    let result = (0..count).try_for_each(|_| {
        let socket = socket_for(bound, true)?;
        socket.bind(&bound.into())?;
        socket.listen(BACKLOG)?;
        if bound.port() == 0 {
            bound = socket.local_addr()?.as_socket().expect("inet socket");
        }
        fds.push(TcpListener::from(socket).into_raw_fd());
        Ok(())
    });
    if let Err(e) = result {
        fds.into_iter().for_each(super::sys::close);
        return Err(classify(bound, e));
    }
    Ok((fds, bound))
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
}
