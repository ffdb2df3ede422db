//! Who may use the admin plane. Every request but the probes (`/healthz`,
//! `/readyz`, `/metrics`, unauthenticated and read-only) must:
//!
//! - name an allowed `Host` (localhost names and the listen address by
//!   default), so a page that reaches this port by DNS rebinding is
//!   refused even before its credentials are asked for;
//! - come from no browser `Origin`, or an allowed one;
//! - carry `Authorization: Bearer <admin key>`, or come over a TLS
//!   connection whose client certificate the admin client CA verified (the
//!   gateway's mTLS). Only such a caller (the gateway, the CLI, an
//!   operator's script) is trusted to say who it acts for (`X-Tether-User`,
//!   `X-Tether-Scopes`); without it those headers are never read.
//!
//! The key lives in a file: given with `--admin-key-file`, or the default
//! under the user's runtime directory, created (mode 0600) with 32 random
//! bytes when missing. The CLI reads the same file.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, fail, respond};

/// The shortest key accepted from a file.
const MIN_KEY_LEN: usize = 16;

/// The shared secret of the admin plane's callers.
#[derive(Clone)]
pub struct AdminKey(Arc<[u8]>);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(…)")
    }
}

impl AdminKey {
    /// 32 bytes from the kernel's random source, as 64 hex digits.
    pub fn random() -> std::io::Result<AdminKey> {
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(AdminKey(hex.into_bytes().into()))
    }

    pub fn new(key: &[u8]) -> AdminKey {
        AdminKey(key.into())
    }

    /// The key as the `Authorization` header carries it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compared in time that does not depend on where they differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        same_bytes(offered, &self.0)
    }

    /// Reads the key in `path`, or creates the file (0600) with a new
    /// random key when it does not exist. A key file others may write, or
    /// anyone may read, is refused. `private`: the path is the default one,
    /// in a directory other users could have made first: the directory and
    /// the file must be ours and closed to everyone else, and the file no
    /// symlink.
    pub fn load_or_create(path: &Path, private: bool) -> Result<AdminKey, String> {
        use std::io::Read;
        let show = path.display();
        if private && let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        let mut open = std::fs::OpenOptions::new();
        open.read(true);
        if private {
            open.custom_flags(libc::O_NOFOLLOW);
        }
        match open.open(path) {
            Ok(mut file) => {
                let meta = file
                    .metadata()
                    .map_err(|e| format!("the admin key file {show}: {e}"))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o026 != 0 {
                    return Err(format!(
                        "the admin key file {show} may be read or changed by others (mode {mode:o}): chmod 600 it"
                    ));
                }
                if private && (meta.uid() != euid() || mode & 0o077 != 0) {
                    return Err(format!(
                        "the admin key file {show} is not ours alone (owner {}, mode {mode:o}): remove it, or pass --admin-key-file",
                        meta.uid()
                    ));
                }
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)
                    .map_err(|e| format!("cannot read the admin key file {show}: {e}"))?;
                let key = bytes.trim_ascii();
                if key.len() < MIN_KEY_LEN {
                    return Err(format!(
                        "the admin key in {show} is shorter than {MIN_KEY_LEN} bytes"
                    ));
                }
                Ok(AdminKey::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let key = AdminKey::random().map_err(|e| format!("no random bytes: {e}"))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| format!("cannot create the admin key file {show}: {e}"))?;
                file.write_all(&key.0)
                    .and_then(|()| file.write_all(b"\n"))
                    .map_err(|e| format!("cannot write the admin key file {show}: {e}"))?;
                Ok(key)
            }
            Err(e) => Err(format!("cannot read the admin key file {show}: {e}")),
        }
    }
}

/// Compares secrets in time that does not depend on where they differ.
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl AdminKey {
    /// The key to call the admin API at `url` with: from `file`, else from
    /// the controller's default file for the URL's port.
    pub fn for_url(url: &str, file: Option<&Path>) -> Result<AdminKey, String> {
        let path = match file {
            Some(p) => p.to_path_buf(),
            None => default_key_path(port_of(url)?),
        };
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read the admin key {} ({e}): the controller writes it at start, or pass --admin-key-file",
                path.display()
            )
        })?;
        Ok(AdminKey::new(bytes.trim_ascii()))
    }
}

/// The port of `http://host:port[/…]` (80 or 443 when none is named).
fn port_of(url: &str) -> Result<u16, String> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split('/').next().unwrap_or("");
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            port.parse()
                .map_err(|_| format!("{url}: the port is not a number"))
        }
        _ if scheme == "https" => Ok(443),
        _ => Ok(80),
    }
}

/// Creates `dir` (0700) or checks that it is ours and closed to others.
fn private_dir(dir: &Path) -> Result<(), String> {
    let show = dir.display();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {show}: {e}"))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{show}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() || meta.uid() != euid() || mode & 0o077 != 0 {
        return Err(format!(
            "{show} is not a directory of ours alone (owner {}, mode {mode:o}): pass --admin-key-file elsewhere",
            meta.uid()
        ));
    }
    Ok(())
}

/// Where the admin key of the admin API on `port` lives when no file is
/// named: `$XDG_RUNTIME_DIR/tether/admin-PORT.key`, else
/// `/tmp/tether-UID/admin-PORT.key`.
pub fn default_key_path(port: u16) -> PathBuf {
    runtime_path(&format!("admin-{port}.key"))
}

/// A file of this user's tether processes: `$XDG_RUNTIME_DIR/tether/NAME`,
/// else `/tmp/tether-UID/NAME`.
pub fn runtime_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("tether"),
        None => PathBuf::from(format!("/tmp/tether-{}", euid())),
    };
    dir.join(name)
}

/// The Host names accepted by default: localhost's, and the listen
/// address when it is a specific one.
pub fn default_hosts(listen: SocketAddr) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .map(|h| h.to_string())
        .collect();
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        hosts.push(match listen {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        });
    }
    hosts
}

/// A Host header's name is allowed, with or without a port.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:8439`, `name:8439`; not the colons inside `[::1]`.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// The probes stay open: no Host, Origin or key is asked of them.
pub(crate) fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// Why a request is refused, if it is. `client_verified`: its connection
/// showed a client certificate the admin client CA verified, which stands
/// in for the key.
pub(crate) fn check(
    state: &super::State,
    headers: &HeaderMap,
    client_verified: bool,
) -> Result<(), super::Reply> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(&state.config.allowed_hosts, host) {
        return Err(fail(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host {host:?} is not one of this admin API's names; add it with --admin-allow-host"
            ),
        ));
    }
    super::check_origin(state, headers)?;
    if client_verified {
        return Ok(());
    }
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match offered {
        Some(key) if state.config.key.matches(key) => Ok(()),
        Some(_) => Err(fail(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer key is not this admin API's",
        )),
        None => Err(fail(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs Authorization: Bearer <the key in --admin-key-file>",
        )),
    }
}

/// The middleware in front of every route.
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_probe(request.uri().path()) {
        return next.run(request).await;
    }
    let client_verified = request
        .extensions()
        .get::<axum::extract::ConnectInfo<super::AdminPeer>>()
        .is_some_and(|peer| peer.0.client_verified);
    match check(&state, request.headers(), client_verified) {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            let unauthorized = refused.0 == StatusCode::UNAUTHORIZED;
            let mut response = respond(refused);
            if unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("ASCII"));
            }
            response.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_by_name_with_or_without_a_port() {
        let allowed = default_hosts("127.0.0.1:8439".parse().unwrap());
        for host in [
            "localhost",
            "localhost:8439",
            "LOCALHOST:1",
            "127.0.0.1:8439",
            "[::1]:8439",
            "[::1]",
        ] {
            assert!(host_allowed(&allowed, host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8439",
            "localhost.evil.example",
            "",
            "127.0.0.2:8439",
        ] {
            assert!(!host_allowed(&allowed, host), "{host}");
        }
        assert_eq!(port_of("http://127.0.0.1:8439/x"), Ok(8439));
        assert_eq!(port_of("http://[::1]:9000"), Ok(9000));
        assert_eq!(port_of("https://admin.example"), Ok(443));
        assert_eq!(port_of("http://[::1]"), Ok(80));
        let on_lan = default_hosts("10.0.0.5:8439".parse().unwrap());
        assert!(host_allowed(&on_lan, "10.0.0.5:8439"));
        assert!(!host_allowed(
            &default_hosts("0.0.0.0:8439".parse().unwrap()),
            "0.0.0.0"
        ));
    }

    #[test]
    fn keys_compare_whole_and_files_are_made_private() {
        let key = AdminKey::new(b"0123456789abcdef");
        assert!(key.matches(b"0123456789abcdef"));
        assert!(!key.matches(b"0123456789abcdeF"));
        assert!(!key.matches(b"0123456789abcde"));
        let dir = std::env::temp_dir().join(format!("tether-key-{}", std::process::id()));
        let path = dir.join("sub/admin.key");
        let made = AdminKey::load_or_create(&path, true).unwrap();
        assert_eq!(made.0.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = AdminKey::load_or_create(&path, true).unwrap();
        assert!(again.matches(&made.0), "read back, not made anew");
        // Someone else's key planted where the default path points: a
        // readable file, or one behind a symlink, is refused.
        let planted = dir.join("planted.key");
        std::fs::write(&planted, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            AdminKey::load_or_create(&planted, false).is_err(),
            "world-readable"
        );
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("sub/link.key");
        std::os::unix::fs::symlink(&planted, &link).unwrap();
        assert!(AdminKey::load_or_create(&link, true).is_err(), "a symlink");
        // An operator's file (a Secret mounted 0400, a symlink) is fine.
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(AdminKey::load_or_create(&link, false).is_ok());
        // A default directory others may enter is refused.
        let open_dir = dir.join("open");
        std::fs::create_dir_all(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(AdminKey::load_or_create(&open_dir.join("k"), true).is_err());
        std::fs::write(&path, "short\n").unwrap();
        assert!(AdminKey::load_or_create(&path, true).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
