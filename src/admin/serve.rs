//! Serving HTTP connections with hyper directly, for the admin plane and
//! the gateway alike: `axum::serve` gives hyper no timer, so a client could
//! hold a connection open forever by trickling a request's headers. Here
//! each request's headers must arrive within `header_timeout`, and at most
//! `MAX_CONNECTIONS` are open at once (more are closed as they come). On
//! stop, connections are asked to finish their request in flight and
//! close, for a bounded time.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::AdminListener;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a request's headers may take to arrive, by default.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, then lets connections finish
/// for at most `grace`. `what` names the server in log lines.
pub async fn serve(
    what: &'static str,
    mut listener: AdminListener,
    app: Router,
    stop: impl Future<Output = ()>,
    grace: Duration,
    header_timeout: Duration,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut stop = pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("{what}: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let (app, mut closing) = (app.clone(), closing_rx.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer.clone()));
                let mut app = app.clone();
                async move {
                    tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let mut conn = pin!(
                builder
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades()
            );
            // (`wait_for`'s guard is dropped in the branch: it is not Send.)
            let closed = async {
                let _ = closing.wait_for(|c| *c).await;
            };
            let stopping = tokio::select! {
                _ = conn.as_mut() => false,
                () = closed => true,
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            drop(permit);
        });
    }
    let _ = closing_tx.send(true);
    // Until every connection has finished, or the grace is up.
    let all = connections.acquire_many(MAX_CONNECTIONS as u32);
    if tokio::time::timeout(grace, all).await.is_err() {
        tracing::warn!("{what}: requests still open after {grace:?}; dropping them");
    }
}
