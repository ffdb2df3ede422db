//! The admin plane's listener: plain TCP, or TLS (rustls through
//! tokio-rustls) with an optional client certificate. A verified client
//! certificate (the gateway's, under `--admin-tls-client-ca`) authenticates
//! its connection as the admin key would.
//!
//! Handshakes run in tasks of their own, at most `MAX_HANDSHAKES` at once
//! and each within `HANDSHAKE_TIMEOUT`, so a slow or silent client never
//! holds up the others' accepts. The TLS config is read at each accept, so
//! a reload takes effect for the next connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::engine::tls::ReloadableConfig;

const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to take them.
const BACKLOG: usize = 1024;

/// The admin listener's TLS, reloadable (`ReloadableConfig::https`).
pub type AdminTls = ReloadableConfig;

/// Who is on the other end of an admin connection.
#[derive(Clone, Debug)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// It presented a client certificate the client CA verified.
    pub client_verified: bool,
}

/// A TCP connection, plain or under TLS (`T`: a tokio-rustls server or
/// client stream).
pub enum TcpOrTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// An admin connection: plain, or TLS.
pub type AdminIo = TcpOrTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for TcpOrTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            TcpOrTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TcpOrTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TcpOrTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            TcpOrTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Plain(s) => Pin::new(s).poll_flush(cx),
            TcpOrTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            TcpOrTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What axum serves: connections as their handshakes complete.
pub struct AdminListener {
    ready: mpsc::Receiver<(AdminIo, AdminPeer)>,
    local: SocketAddr,
}

impl AdminListener {
    /// Starts accepting on `tcp` (in the current runtime); `tune` sets each
    /// socket's options.
    pub fn start(
        tcp: tokio::net::TcpListener,
        tls: Option<Arc<AdminTls>>,
        tune: impl Fn(&TcpStream) + Send + Sync + 'static,
    ) -> std::io::Result<AdminListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(BACKLOG);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("admin accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tune(&stream);
                let Some(tls) = &tls else {
                    let peer = AdminPeer {
                        addr,
                        client_verified: false,
                    };
                    if tx.send((TcpOrTls::Plain(stream), peer)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    continue; // too many handshakes at once: dropped
                };
                let (acceptor, tx) = (tokio_rustls::TlsAcceptor::from(tls.current()), tx.clone());
                tokio::spawn(async move {
                    let done =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    drop(permit);
                    let Ok(Ok(stream)) = done else { return };
                    let client_verified = stream.get_ref().1.peer_certificates().is_some();
                    let peer = AdminPeer {
                        addr,
                        client_verified,
                    };
                    let _ = tx.send((TcpOrTls::Tls(Box::new(stream)), peer)).await;
                });
            }
        });
        Ok(AdminListener { ready, local })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminIo;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (AdminIo, AdminPeer) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended (the runtime is stopping).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<AdminPeer> {
        Ok(AdminPeer {
            addr: self.local,
            client_verified: false,
        })
    }
}

impl Connected<IncomingStream<'_, AdminListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> AdminPeer {
        stream.remote_addr().clone()
    }
}
