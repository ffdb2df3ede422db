//! A client of a controller's admin plane, for the gateway and for cluster
//! nodes forwarding commands to the node that holds an instance: HTTP/1.1
//! over connections of its own, plain or TLS, kept in a small pool, and
//! WebSockets for `/events` and `/ctrl/mcp`. It authenticates with the
//! admin key (`Authorization: Bearer`) or, over TLS, with a client
//! certificate the admin plane's client CA signed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::TcpOrTls;
use super::access::AdminKey;

/// The longest a connection to the admin plane may take to open (TCP and
/// TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 32;
/// A connection that is still busy this long after its response began
/// (a stream) is not taken back into the pool.
const RETURN_WAIT: Duration = Duration::from_secs(30);
/// The longest the admin plane may take to start answering: its longest
/// command timeout (5 minutes) and some.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(310);

/// Where the admin plane is, and how the gateway proves who it is.
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port` (no path).
    pub url: String,
    /// Sent as `Authorization: Bearer`; with a client certificate it may be
    /// left out.
    pub key: Option<AdminKey>,
    /// For https: the CA (PEM) that signed the admin plane's certificate.
    pub ca: Option<std::path::PathBuf>,
    /// For https: the gateway's client certificate chain and key (PEM).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

pub struct Upstream {
    host: String,
    port: u16,
    /// The `Host` header: `host:port`.
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    bearer: Option<String>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// A connection to the admin plane.
pub type UpstreamIo = TcpOrTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// `scheme://host[:port]` split, the default port filled in.
fn split_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!(
            "the upstream {url:?} is not an http:// or https:// URL"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "the upstream {url:?} must be scheme://host[:port], with no path"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) => (
            h.to_string(),
            p.parse()
                .map_err(|_| format!("the upstream {url:?} has a bad port"))?,
        ),
        _ => (rest.to_string(), if tls { 443 } else { 80 }),
    };
    Ok((tls, host, port))
}

fn tls_connector(
    config: &UpstreamConfig,
    host: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
    let roots = match &config.ca {
        Some(ca) => crate::engine::tls::load_roots(ca)?,
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the gateway's client certificate: {e}"))?
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| format!("the upstream host {host:?}: {e}"))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
}

use rustls::pki_types::pem::PemObject;

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, String> {
        let (tls, host, port) = split_url(&config.url)?;
        if !tls && (config.ca.is_some() || config.client_cert.is_some()) {
            return Err(format!(
                "a CA or client certificate for the upstream needs an https:// URL, not {}",
                config.url
            ));
        }
        if config.key.is_none() && config.client_cert.is_none() {
            return Err(
                "the gateway needs the admin key or a client certificate to call the admin plane"
                    .into(),
            );
        }
        let tls = tls.then(|| tls_connector(config, &host)).transpose()?;
        Ok(Upstream {
            authority: format!("{host}:{port}"),
            host,
            port,
            tls,
            bearer: config.key.as_ref().map(AdminKey::bearer),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// `Host` for requests upstream.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `Authorization` for requests upstream, if the key is used.
    pub fn bearer(&self) -> Option<&str> {
        self.bearer.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection, TCP and TLS done within `CONNECT_TIMEOUT`.
    pub async fn connect(&self) -> Result<UpstreamIo, String> {
        let open = async {
            let host = self.host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, self.port))
                .await
                .map_err(|e| format!("cannot reach the admin plane at {}: {e}", self.authority))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(TcpOrTls::Plain(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| TcpOrTls::Tls(Box::new(s)))
                    .map_err(|e| format!("TLS to the admin plane at {}: {e}", self.authority)),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| {
                format!(
                    "the admin plane at {} did not answer within {CONNECT_TIMEOUT:?}",
                    self.authority
                )
            })?
    }

    /// An idle pooled connection (true), or a new one (false).
    async fn sender(&self) -> Result<(SendRequest<Full<Bytes>>, bool), String> {
        loop {
            let Some(mut sender) = self.idle.lock().unwrap().pop() else {
                break;
            };
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok((sender, true));
            }
        }
        self.sender_new().await
    }

    /// Sends `request`; the response's body streams. The connection goes
    /// back to the pool once that body is read (or is dropped if it stays
    /// busy longer than `RETURN_WAIT`, as an event stream does).
    ///
    /// A pooled connection the admin plane closed while it sat idle fails
    /// the request that finds it: then the request is sent once more on a
    /// new connection, if it never left, or if it is a GET (which may be
    /// repeated; a command is never sent twice).
    pub async fn send(
        self: &Arc<Self>,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let repeatable = (request.method() == hyper::Method::GET).then(|| copy(&request));
        let (sender, reused) = self.sender().await?;
        let (sender, response) = match self.exchange(sender, request).await {
            Err(Failed::Unsent(request)) if reused => {
                let (sender, _) = self.sender_new().await?;
                self.exchange(sender, *request).await
            }
            Err(Failed::Sent(_)) if reused && repeatable.is_some() => {
                let (sender, _) = self.sender_new().await?;
                self.exchange(sender, repeatable.expect("checked")).await
            }
            done => done,
        }
        .map_err(|f| f.message(&self.authority))?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut sender = sender;
            if let Ok(Ok(())) = tokio::time::timeout(RETURN_WAIT, sender.ready()).await {
                let mut idle = this.idle.lock().unwrap();
                if idle.len() < MAX_IDLE {
                    idle.push(sender);
                }
            }
        });
        Ok(response)
    }

    /// A new connection, never a pooled one.
    async fn sender_new(&self) -> Result<(SendRequest<Full<Bytes>>, bool), String> {
        let io = TokioIo::new(self.connect().await?);
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP to the admin plane: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, false))
    }

    /// One request on one connection, within `RESPONSE_TIMEOUT`.
    async fn exchange(
        &self,
        mut sender: SendRequest<Full<Bytes>>,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(SendRequest<Full<Bytes>>, hyper::Response<Incoming>), Failed> {
        match tokio::time::timeout(RESPONSE_TIMEOUT, sender.try_send_request(request)).await {
            Err(_) => Err(Failed::TimedOut),
            Ok(Ok(response)) => Ok((sender, response)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(request) => Err(Failed::Unsent(Box::new(request))),
                None => Err(Failed::Sent(e.into_error().to_string())),
            },
        }
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// Why one exchange failed.
enum Failed {
    /// The connection failed before the request left: it may go again.
    Unsent(Box<hyper::Request<Full<Bytes>>>),
    /// It failed after the request left (or while it did).
    Sent(String),
    TimedOut,
}

impl Failed {
    fn message(self, authority: &str) -> String {
        match self {
            Failed::Unsent(_) => format!("the admin plane at {authority} closed the connection"),
            Failed::Sent(e) => format!("the admin plane at {authority}: {e}"),
            Failed::TimedOut => {
                format!("the admin plane at {authority} did not answer within {RESPONSE_TIMEOUT:?}")
            }
        }
    }
}

/// A copy of a request (to send a GET again).
fn copy(request: &hyper::Request<Full<Bytes>>) -> hyper::Request<Full<Bytes>> {
    let mut copy = hyper::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_split_into_scheme_host_and_port() {
        assert_eq!(
            split_url("http://127.0.0.1:8439").unwrap(),
            (false, "127.0.0.1".into(), 8439)
        );
        assert_eq!(
            split_url("https://[::1]:9000/").unwrap(),
            (true, "[::1]".into(), 9000)
        );
        assert_eq!(
            split_url("https://admin.internal").unwrap(),
            (true, "admin.internal".into(), 443)
        );
        assert_eq!(
            split_url("http://[::1]").unwrap(),
            (false, "[::1]".into(), 80)
        );
        for bad in [
            "127.0.0.1:8439",
            "ftp://x",
            "http://",
            "http://h:1/path",
            "http://u@h",
            "http://h:99999",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
