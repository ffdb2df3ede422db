//! Thin wrappers over the socket and process syscalls the drivers use.
//! Each returns `io::Result` and carries no policy: retries, limits and
//! what an error means are decided by the caller.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Gives the calling thread its own copy of the fd table, so the fds it
/// opens from now on count against its own RLIMIT_NOFILE.
pub fn unshare_fd_table() -> io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_FILES affects just this thread.
    check(unsafe { libc::unshare(libc::CLONE_FILES) }).map(drop)
}

/// The fds open in the calling thread's table.
pub fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/thread-self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    Ok(fds)
}

pub fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and never uses it again.
    unsafe { libc::close(fd) };
}

/// Accepts one connection, non-blocking and close-on-exec.
/// Accepts one connection: its fd and, where the kernel tells it, its
/// peer's address.
pub fn accept(listener: RawFd) -> io::Result<(RawFd, Option<SocketAddr>)> {
    // SAFETY: zeroed sockaddr_storage is a valid (empty) address.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` are valid for writes for the call.
    let fd = check(unsafe {
        libc::accept4(
            listener,
            (&raw mut storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    Ok((fd, socket_addr(storage, len)))
}

/// The socket address in `storage` (as an accept wrote it), with an
/// IPv4-mapped IPv6 address unwrapped (`::ffff:10.0.0.7` is `10.0.0.7`).
pub fn socket_addr(storage: libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(v4.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                ip.to_canonical(),
                u16::from_be(v6.sin6_port),
            ))
        }
        _ => None,
    }
}

pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    check_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// Sends without raising SIGPIPE on a closed peer (EPIPE instead).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    check_size(unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on an fd we own; an error (already closed) is harmless.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Disables Nagle: control messages are small and latency-bound.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a live c_int with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn nofile_rlimit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok(lim)
}

/// The soft RLIMIT_NOFILE: how many fds one fd table may hold.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(nofile_rlimit()?.rlim_cur)
}

/// The hard RLIMIT_NOFILE: what `raise_nofile_limit` can reach.
pub fn nofile_hard_limit() -> io::Result<u64> {
    Ok(nofile_rlimit()?.rlim_max)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (never beyond it).
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = nofile_rlimit()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and the threads
/// it spawns afterwards) so one thread can wait for them with
/// `wait_for_signal`.
pub fn block_termination_signals() -> io::Result<()> {
    // SAFETY: builds a signal set on the stack and changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
    }
    Ok(())
}

/// Waits up to `timeout` for SIGINT, SIGTERM or SIGHUP (blocked beforehand
/// with `block_termination_signals`); returns the signal, or `None` on
/// timeout.
pub fn wait_for_signal(timeout: std::time::Duration) -> io::Result<Option<i32>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the set and timespec live on the stack for the call; a null
    // siginfo pointer is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        if sig < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(sig))
    }
}

/// An eventfd: a counter other threads write to wake a loop.
pub fn eventfd() -> io::Result<RawFd> {
    // SAFETY: eventfd takes an initial value and flags.
    check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

pub fn eventfd_wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; EAGAIN (counter full) still
    // leaves the fd readable, which is all a wake needs.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

pub fn eventfd_drain(fd: RawFd) {
    let mut value: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64.
    unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

/// Lets `bind(ip:0)` defer the port choice to `connect`, so one source
/// address serves ~28k connections per destination, not ~28k in all.
pub fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a live c_int with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The pending error of a socket (SO_ERROR), e.g. a failed connect.
pub fn take_socket_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `err`.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// Opts this process out of transparent huge pages. tether's memory is
/// many small records spread over allocator pages; huge pages would make
/// each touched region cost 2 MiB of RSS instead of 4 KiB.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) }).map(drop)
}

/// `struct inet_diag_sockid` (linux/inet_diag.h): ports and addresses in
/// network order.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;

/// Every TCP socket listening in this network namespace, IPv4 and IPv6,
/// with its inode, from sock_diag: the kernel walks its listening table
/// only, however many connections there are.
pub fn tcp_listeners() -> io::Result<Vec<(SocketAddr, u32)>> {
    // SAFETY: a netlink socket we own, closed below.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    })?;
    let result = (|| {
        let mut found = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            dump_listeners(fd, family as u8, &mut found)?;
        }
        Ok(found)
    })();
    close(fd);
    result
}

fn dump_listeners(fd: RawFd, family: u8, found: &mut Vec<(SocketAddr, u32)>) -> io::Result<()> {
    #[repr(C)]
    struct Request {
        header: libc::nlmsghdr,
        body: InetDiagReqV2,
    }
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body: InetDiagReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: 1 << TCP_LISTEN,
            id: InetDiagSockId {
                sport: 0,
                dport: 0,
                src: [0; 16],
                dst: [0; 16],
                interface: 0,
                cookie: [0; 2],
            },
        },
    };
    // SAFETY: sends the request struct's own bytes; the kernel's netlink
    // is the peer (address zeroed: the kernel).
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd,
            (&raw const request).cast(),
            std::mem::size_of::<Request>(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    check_size(sent)?;
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = recv(fd, &mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag ended",
            ));
        }
        let mut at = 0;
        while at + header_len <= n {
            // SAFETY: at least a header's bytes remain; read unaligned.
            let header: libc::nlmsghdr =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let len = header.nlmsg_len as usize;
            if len < header_len || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag: a bad message",
                ));
            }
            match i32::from(header.nlmsg_type) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    // An nlmsgerr: a negative errno first.
                    let errno = if len >= header_len + 4 {
                        // SAFETY: 4 bytes within the message.
                        unsafe {
                            std::ptr::read_unaligned(buf[at + header_len..].as_ptr().cast::<i32>())
                        }
                    } else {
                        -libc::EIO
                    };
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ if len >= header_len + std::mem::size_of::<InetDiagMsg>() => {
                    // SAFETY: a whole inet_diag_msg within the message.
                    let msg: InetDiagMsg =
                        unsafe { std::ptr::read_unaligned(buf[at + header_len..].as_ptr().cast()) };
                    let port = u16::from_be(msg.id.sport);
                    let ip: std::net::IpAddr = if msg.family == libc::AF_INET as u8 {
                        std::net::Ipv4Addr::new(
                            msg.id.src[0],
                            msg.id.src[1],
                            msg.id.src[2],
                            msg.id.src[3],
                        )
                        .into()
                    } else {
                        std::net::Ipv6Addr::from(msg.id.src).into()
                    };
                    found.push((SocketAddr::new(ip, port), msg.inode));
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
    }
}
