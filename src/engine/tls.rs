//! TLS 1.3 on the shard's connections, with nothing buffered at rest.
//!
//! rustls runs the handshake (its unbuffered API, over bytes the shard
//! hands in). Once it is done the traffic keys are taken out
//! (`dangerous_into_kernel_connection`), rustls' state is dropped, and this
//! module's record layer seals and opens records in buffers the caller
//! owns (the shard's scratch). An idle connection then keeps only its
//! `Keys`: for each direction the AEAD key, IV, sequence number and the
//! traffic secret a KeyUpdate derives the next one from. The secrets come
//! from rustls' key log, which it calls during the handshake on the thread
//! that drives it (a shard's): a thread-local hands them to the connection
//! being served. AEAD contexts are built per burst of records, not kept.
//!
//! After the handshake the record layer handles application data, alerts
//! (close_notify ends the stream; any other alert is an error), KeyUpdate
//! (answered when the peer asks), and refuses everything else a server
//! should never receive then.
//!
//! Sans-IO: bytes in, bytes out. Never: TLS 1.2, 0-RTT, session tickets
//! (no state kept for resumption), a plaintext record over 2^14 bytes, or
//! more than one record's worth of partial input held per connection.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ring::{aead, hkdf};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Largest plaintext in one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext of one record (§5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Handshake bytes held while waiting for the rest of a flight (a flight,
/// and what a client sends right after its Finished, within one read).
const MAX_HANDSHAKE_INPUT: usize = 128 << 10;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
/// KeyUpdates accepted between two records of application data (each
/// costs key derivations on the shard, so a flood of them is refused).
const MAX_KEY_UPDATES: u8 = 8;
/// Records sealed under one key before we move to the next (AES-GCM's
/// limit is 2^24.5, RFC 8446 §5.5); the tests reach it quickly.
#[cfg(not(test))]
const TX_KEY_UPDATE_AT: u64 = 1 << 24;
#[cfg(test)]
const TX_KEY_UPDATE_AT: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake failed: {0}")]
    Handshake(#[from] rustls::Error),
    #[error("a TLS record longer than the protocol allows")]
    RecordTooLong,
    #[error("a TLS record that does not decrypt")]
    BadRecord,
    #[error("the peer sent TLS alert {0}")]
    Alert(u8),
    #[error("unexpected {0} after the TLS handshake")]
    Unexpected(&'static str),
    #[error("the TLS handshake did not yield usable TLS 1.3 keys")]
    NoKeys,
    #[error("more handshake input than a flight needs")]
    HandshakeTooLong,
    #[error("application data before the TLS handshake is done")]
    NotOpen,
}

/// Where a listener's certificate, key and (for mTLS) client CA live.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// A listener's rustls config and the files it came from, swapped whole
/// on a reload: new handshakes take the new one, open connections keep
/// what they have.
pub struct ReloadableConfig {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<ServerConfig, String>,
    config: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for ReloadableConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableConfig")
            .field("files", &self.files)
            .finish()
    }
}

impl ReloadableConfig {
    fn new(
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<ServerConfig, String>,
    ) -> Result<ReloadableConfig, String> {
        let config = build(&files)?;
        Ok(ReloadableConfig {
            files,
            build,
            config: RwLock::new(Arc::new(config)),
        })
    }

    /// An HTTPS listener's (`https_config`).
    pub fn https(files: TlsFiles) -> Result<ReloadableConfig, String> {
        ReloadableConfig::new(files, https_config)
    }

    /// Reads the files again; on an error the config in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = (self.build)(&self.files)?;
        *self.config.write().unwrap() = Arc::new(config);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.read().unwrap().clone()
    }
}

/// The service listener's TLS: sessions over a reloadable config.
#[derive(Debug)]
pub struct TlsAcceptor(ReloadableConfig);

impl std::ops::Deref for TlsAcceptor {
    type Target = ReloadableConfig;

    fn deref(&self) -> &ReloadableConfig {
        &self.0
    }
}

impl TlsAcceptor {
    pub fn new(files: TlsFiles) -> Result<TlsAcceptor, String> {
        ReloadableConfig::new(files, server_config).map(TlsAcceptor)
    }

    /// A new connection's session, in its handshake.
    pub fn session(&self) -> Result<Session, TlsError> {
        Ok(Session(State::Handshaking(Box::new(Handshake {
            conn: UnbufferedServerConnection::new(self.current())?,
            incoming: Vec::new(),
            secrets: Captured::default(),
        }))))
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// The certificate chain and key in `files`.
pub fn load_chain(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect())
        .map_err(|e| format!("cannot read the certificates in {}: {e}", show(&files.cert)))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", show(&files.cert)));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("cannot read the private key in {}: {e}", show(&files.key)))?;
    Ok((certs, key))
}

/// A verifier of client certificates signed by the CA in `ca`; with
/// `optional`, a client may also present none.
fn client_verifier(
    ca: &Path,
    optional: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider);
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| format!("the client CA {}: {e}", show(ca)))
}

/// The CA certificates in the PEM file `ca`, as trust anchors.
pub fn load_roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read the CA {}: {e}", show(ca)))?
    {
        let cert = cert.map_err(|e| format!("the CA {}: {e}", show(ca)))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA {}: {e}", show(ca)))?;
    }
    Ok(roots)
}

fn with_chain(
    builder: rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>,
    files: &TlsFiles,
    optional_client: bool,
) -> Result<ServerConfig, String> {
    let (certs, key) = load_chain(files)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, optional_client)?),
    };
    builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "the key in {} does not fit the certificate in {}: {e}",
            show(&files.key),
            show(&files.cert)
        )
    })
}

/// The service listener's config: TLS 1.3 only, keys extractable, no
/// tickets; a client certificate required when `client_ca` is set.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?;
    let mut config = with_chain(builder, files, false)?;
    // No tickets: nothing is kept for resumption, and the keys can be
    // taken out as soon as the handshake ends.
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(CaptureSecrets);
    Ok(config)
}

/// An HTTPS listener's config (the admin plane): TLS 1.2 and 1.3, HTTP/1.1;
/// with `client_ca`, a client certificate is verified when one is shown
/// (it then authenticates its connection), and optional otherwise.
pub fn https_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = with_chain(builder, files, true)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The application traffic secrets of the handshake being driven on this
/// thread, as rustls' key log reports them.
#[derive(Default)]
struct Captured {
    client: Option<Vec<u8>>,
    server: Option<Vec<u8>>,
}

thread_local! {
    static CAPTURED: RefCell<Captured> = RefCell::new(Captured::default());
}

#[derive(Debug)]
struct CaptureSecrets;

impl rustls::KeyLog for CaptureSecrets {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAPTURED.with(|c| {
            let mut c = c.borrow_mut();
            match label {
                "CLIENT_TRAFFIC_SECRET_0" => c.client = Some(secret.to_vec()),
                "SERVER_TRAFFIC_SECRET_0" => c.server = Some(secret.to_vec()),
                _ => {}
            }
        });
    }
}

struct Handshake {
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not consumed yet.
    incoming: Vec<u8>,
    secrets: Captured,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256Gcm => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            _ => 32,
        }
    }

    fn secret_len(self) -> usize {
        match self {
            Suite::Aes256Gcm => 48,
            _ => 32,
        }
    }
}

/// One direction's keys.
struct Direction {
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
    secret: [u8; 48],
}

impl Direction {
    fn new(suite: Suite, secret: &[u8], seq: u64) -> Direction {
        let mut d = Direction {
            key: [0; 32],
            iv: [0; 12],
            seq,
            secret: [0; 48],
        };
        d.secret[..secret.len()].copy_from_slice(secret);
        d.derive(suite);
        d
    }

    /// Key and IV from the traffic secret (RFC 8446 §7.3).
    fn derive(&mut self, suite: Suite) {
        let secret = &self.secret[..suite.secret_len()];
        expand_label(suite, secret, b"key", &mut self.key[..suite.key_len()]);
        expand_label(suite, secret, b"iv", &mut self.iv);
    }

    /// The next generation of keys (KeyUpdate, §7.2).
    fn update(&mut self, suite: Suite) {
        let mut next = [0u8; 48];
        let len = suite.secret_len();
        expand_label(suite, &self.secret[..len], b"traffic upd", &mut next[..len]);
        self.secret = next;
        self.seq = 0;
        self.derive(suite);
    }

    fn aead(&self, suite: Suite) -> aead::LessSafeKey {
        let key = aead::UnboundKey::new(suite.aead(), &self.key[..suite.key_len()])
            .expect("the suite's key length");
        aead::LessSafeKey::new(key)
    }

    /// The nonce of the next record, which it uses up.
    fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Best effort: no copy of the secrets outlives the connection here.
        self.key.fill(0);
        self.secret.fill(0);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1).
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(suite.hkdf(), secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("output lengths within HKDF's bound");
}

/// An open connection's record layer.
struct Keys {
    suite: Suite,
    tx: Direction,
    rx: Direction,
    /// The start of a record not whole yet (empty, and unallocated, when
    /// none is).
    partial: Vec<u8>,
    /// KeyUpdates received since the last application data.
    key_updates: u8,
}

/// What a read found besides plaintext.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// The handshake completed in this read.
    pub established: bool,
    /// The peer sent close_notify: no more data comes.
    pub peer_closed: bool,
}

enum State {
    Handshaking(Box<Handshake>),
    Open(Box<Keys>),
    Failed,
}

/// One connection's TLS.
pub struct Session(State);

impl Session {
    /// The handshake is done and records can be sealed.
    pub fn is_open(&self) -> bool {
        matches!(self.0, State::Open(_))
    }

    /// Received bytes held, not yet whole records (counted as buffered).
    pub fn held(&self) -> usize {
        match &self.0 {
            State::Handshaking(h) => h.incoming.capacity(),
            State::Open(k) => k.partial.capacity(),
            State::Failed => 0,
        }
    }

    /// Takes received bytes: plaintext is appended to `plain`, records to
    /// send (the handshake's, a KeyUpdate's answer) to `wire`.
    pub fn read(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Read, TlsError> {
        let result = match &mut self.0 {
            State::Open(keys) => keys.read(data, plain, wire),
            State::Handshaking(hs) => match hs.drive(data, plain, wire) {
                Ok(None) => Ok(Read::default()),
                Ok(Some(peer_closed)) if peer_closed => Ok(Read {
                    established: false,
                    peer_closed,
                }),
                Ok(Some(_)) => {
                    let State::Handshaking(hs) = std::mem::replace(&mut self.0, State::Failed)
                    else {
                        unreachable!()
                    };
                    let (mut keys, mut rest) = hs.finish()?;
                    let mut read = keys.read(&mut rest, plain, wire)?;
                    read.established = true;
                    self.0 = State::Open(keys);
                    Ok(read)
                }
                Err(e) => Err(e),
            },
            State::Failed => Err(TlsError::NotOpen),
        };
        if result.is_err() {
            self.0 = State::Failed;
        }
        result
    }

    /// Seals `plain` into records appended to `wire`.
    pub fn seal(&mut self, plain: &[u8], wire: &mut Vec<u8>) -> Result<(), TlsError> {
        match &mut self.0 {
            State::Open(keys) => {
                keys.seal(APPLICATION_DATA, plain, wire);
                Ok(())
            }
            _ => Err(TlsError::NotOpen),
        }
    }

    /// A close_notify alert, if the session is open.
    pub fn close_notify(&mut self, wire: &mut Vec<u8>) {
        if let State::Open(keys) = &mut self.0 {
            keys.seal(ALERT, &[1, CLOSE_NOTIFY], wire);
        }
    }
}

impl Handshake {
    /// Runs rustls over what has arrived. `None`: more input is needed;
    /// `Some(false)`: the handshake is done; `Some(true)`: the peer closed.
    fn drive(
        &mut self,
        data: &[u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Option<bool>, TlsError> {
        if self.incoming.len() + data.len() > MAX_HANDSHAKE_INPUT {
            return Err(TlsError::HandshakeTooLong);
        }
        self.incoming.extend_from_slice(data);
        CAPTURED.with(|c| *c.borrow_mut() = Captured::default());
        let outcome = self.run(plain, wire);
        let captured = CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()));
        self.secrets.client = captured.client.or(self.secrets.client.take());
        self.secrets.server = captured.server.or(self.secrets.server.take());
        outcome
    }

    fn run(&mut self, plain: &mut Vec<u8>, wire: &mut Vec<u8>) -> Result<Option<bool>, TlsError> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let outcome = match state? {
                ConnectionState::EncodeTlsData(mut encode) => {
                    let start = wire.len();
                    wire.resize(start + 4096, 0);
                    let n = match encode.encode(&mut wire[start..]) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(need)) => {
                            wire.resize(start + need.required_size, 0);
                            encode.encode(&mut wire[start..]).map_err(encode_failed)?
                        }
                        Err(e) => return Err(encode_failed(e)),
                    };
                    wire.truncate(start + n);
                    None
                }
                // What was encoded is in `wire`: the caller sends it.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(None),
                ConnectionState::WriteTraffic(_) => Some(Some(false)),
                ConnectionState::ReadTraffic(mut read) => {
                    while let Some(record) = read.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => Some(Some(true)),
                ConnectionState::ReadEarlyData(_) => {
                    return Err(TlsError::Unexpected("early data"));
                }
                _ => return Err(TlsError::Unexpected("a TLS state")),
            };
            self.incoming.drain(..discard);
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
    }

    /// Takes the keys out of the finished handshake; returns them and the
    /// received bytes that follow it (records for the record layer).
    fn finish(self: Box<Handshake>) -> Result<(Box<Keys>, Vec<u8>), TlsError> {
        let Handshake {
            conn,
            incoming,
            secrets,
        } = *self;
        let (
            ExtractedSecrets {
                tx: (tx_seq, tx),
                rx: (rx_seq, rx),
            },
            _kernel,
        ) = conn.dangerous_into_kernel_connection()?;
        let (Some(client), Some(server)) = (secrets.client, secrets.server) else {
            return Err(TlsError::NoKeys);
        };
        let suite = match &tx {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Suite::Aes128Gcm,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Suite::Aes256Gcm,
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Suite::Chacha20Poly1305,
            _ => return Err(TlsError::NoKeys),
        };
        if client.len() != suite.secret_len() || server.len() != suite.secret_len() {
            return Err(TlsError::NoKeys);
        }
        let keys = Box::new(Keys {
            suite,
            tx: Direction::new(suite, &server, tx_seq),
            rx: Direction::new(suite, &client, rx_seq),
            partial: Vec::new(),
            key_updates: 0,
        });
        // The secrets the key log gave must be the ones rustls keyed with.
        if !same_key(&tx, &keys.tx, suite) || !same_key(&rx, &keys.rx, suite) {
            return Err(TlsError::NoKeys);
        }
        Ok((keys, incoming))
    }
}

fn encode_failed(e: EncodeError) -> TlsError {
    TlsError::Handshake(rustls::Error::General(e.to_string()))
}

fn same_key(extracted: &ConnectionTrafficSecrets, ours: &Direction, suite: Suite) -> bool {
    let (key, iv) = match extracted {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => return false,
    };
    key.as_ref() == &ours.key[..suite.key_len()] && iv.as_ref() == ours.iv
}

impl Keys {
    /// Seals `plain` as records of `content_type`.
    fn seal(&mut self, content_type: u8, plain: &[u8], wire: &mut Vec<u8>) {
        let mut key = self.tx.aead(self.suite);
        let mut chunks = plain.chunks(MAX_PLAINTEXT);
        let mut next = chunks.next().or(Some(&[]));
        while let Some(chunk) = next {
            if self.tx.seq >= TX_KEY_UPDATE_AT {
                // Ours, not asking the peer to update back.
                self.seal_record(&key, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], wire);
                self.tx.update(self.suite);
                key = self.tx.aead(self.suite);
            }
            self.seal_record(&key, content_type, chunk, wire);
            next = chunks.next();
        }
    }

    fn seal_record(
        &mut self,
        key: &aead::LessSafeKey,
        content_type: u8,
        chunk: &[u8],
        wire: &mut Vec<u8>,
    ) {
        let len = ((chunk.len() + 1 + TAG) as u16).to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, len[0], len[1]];
        wire.reserve(HEADER + chunk.len() + 1 + TAG);
        wire.extend_from_slice(&header);
        let start = wire.len();
        wire.extend_from_slice(chunk);
        wire.push(content_type);
        let nonce = self.tx.next_nonce();
        let tag = key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut wire[start..])
            .expect("a record within AEAD's bound");
        wire.extend_from_slice(tag.as_ref());
    }

    /// Opens the whole records in `partial` + `data`, keeping the rest.
    fn read(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Read, TlsError> {
        if self.partial.is_empty() {
            let used = self.open_records(data, plain, wire)?;
            if !used.peer_closed {
                self.partial.extend_from_slice(&data[used.consumed..]);
            }
            return Ok(used.read());
        }
        let mut joined = std::mem::take(&mut self.partial);
        joined.extend_from_slice(data);
        let used = self.open_records(&mut joined, plain, wire)?;
        if !used.peer_closed {
            joined.drain(..used.consumed);
            if !joined.is_empty() {
                // Keep it small: a whole record's worth at most.
                joined.shrink_to(MAX_CIPHERTEXT + HEADER);
                self.partial = joined;
            }
        }
        Ok(used.read())
    }

    /// Opens every whole record at the front of `buf`.
    fn open_records(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Opened, TlsError> {
        let mut key = self.rx.aead(self.suite);
        let mut at = 0;
        while buf.len() - at >= HEADER {
            let header: [u8; HEADER] = buf[at..at + HEADER].try_into().expect("5 bytes");
            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
            if len > MAX_CIPHERTEXT {
                return Err(TlsError::RecordTooLong);
            }
            if buf.len() - at < HEADER + len {
                break;
            }
            if header[0] != APPLICATION_DATA {
                return Err(TlsError::Unexpected("an unprotected record"));
            }
            let record = &mut buf[at + HEADER..at + HEADER + len];
            at += HEADER + len;
            let nonce = self.rx.next_nonce();
            let inner = key
                .open_in_place(nonce, aead::Aad::from(header), record)
                .map_err(|_| TlsError::BadRecord)?;
            // The content type is the last non-zero byte (after padding).
            let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                return Err(TlsError::Unexpected("a record with no content type"));
            };
            if inner.len() > MAX_PLAINTEXT + 1 {
                return Err(TlsError::RecordTooLong);
            }
            let (content, content_type) = (&inner[..end], inner[end]);
            match content_type {
                APPLICATION_DATA => {
                    self.key_updates = 0;
                    plain.extend_from_slice(content);
                }
                ALERT => match content {
                    [_, CLOSE_NOTIFY] => {
                        return Ok(Opened {
                            consumed: at,
                            peer_closed: true,
                        });
                    }
                    [_, description] => return Err(TlsError::Alert(*description)),
                    _ => return Err(TlsError::Unexpected("a malformed alert")),
                },
                HANDSHAKE => {
                    if self.post_handshake(content, wire)? {
                        key = self.rx.aead(self.suite);
                    }
                }
                _ => return Err(TlsError::Unexpected("a record of unknown type")),
            }
        }
        Ok(Opened {
            consumed: at,
            peer_closed: false,
        })
    }

    /// Handshake messages after the handshake: only KeyUpdate is valid
    /// from a client. True when the receiving keys changed.
    fn post_handshake(
        &mut self,
        mut messages: &[u8],
        wire: &mut Vec<u8>,
    ) -> Result<bool, TlsError> {
        let mut updated = false;
        while !messages.is_empty() {
            let [kind, a, b, c, rest @ ..] = messages else {
                return Err(TlsError::Unexpected("a fragmented handshake message"));
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(TlsError::Unexpected("a fragmented handshake message"));
            }
            let (body, next) = rest.split_at(len);
            match (*kind, body) {
                // A KeyUpdate ends its record (RFC 8446 §5.1).
                (KEY_UPDATE, [_]) if !next.is_empty() => {
                    return Err(TlsError::Unexpected("data after a KeyUpdate in its record"));
                }
                (KEY_UPDATE, [_]) if self.key_updates >= MAX_KEY_UPDATES => {
                    return Err(TlsError::Unexpected("KeyUpdates with no data between them"));
                }
                (KEY_UPDATE, [request]) if *request <= 1 => {
                    self.key_updates += 1;
                    self.rx.update(self.suite);
                    updated = true;
                    if *request == 1 {
                        // update_requested: answer with ours (not asking
                        // back), sealed with the old keys, then move on.
                        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], wire);
                        self.tx.update(self.suite);
                    }
                }
                (KEY_UPDATE, _) => return Err(TlsError::Unexpected("a malformed KeyUpdate")),
                _ => return Err(TlsError::Unexpected("a handshake message")),
            }
            messages = next;
        }
        Ok(updated)
    }
}

/// How far `open_records` got.
struct Opened {
    consumed: usize,
    peer_closed: bool,
}

impl Opened {
    fn read(&self) -> Read {
        Read {
            established: false,
            peer_closed: self.peer_closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn keys_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    fn files(name: &str, client_ca: bool) -> TlsFiles {
        TlsFiles {
            cert: keys_dir().join(format!("{name}.pem")),
            key: keys_dir().join(format!("{name}.key")),
            client_ca: client_ca.then(|| keys_dir().join("ca.pem")),
        }
    }

    fn client(with_cert: bool) -> rustls::ClientConnection {
        let roots = load_roots(&keys_dir().join("ca.pem")).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = if with_cert {
            let certs = CertificateDer::pem_file_iter(keys_dir().join("client.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(keys_dir().join("client.key")).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
    }

    /// Client and server in memory; `chunk` bytes at a time to the server.
    struct Pair {
        client: rustls::ClientConnection,
        server: Session,
        /// Plaintext the server got, and whether the peer closed.
        got: Vec<u8>,
        closed: bool,
        established: usize,
        chunk: usize,
    }

    impl Pair {
        fn new(acceptor: &TlsAcceptor, client: rustls::ClientConnection, chunk: usize) -> Pair {
            Pair {
                client,
                server: acceptor.session().unwrap(),
                got: Vec::new(),
                closed: false,
                established: 0,
                chunk,
            }
        }

        /// Moves bytes both ways until neither side has any to send.
        fn pump(&mut self) -> Result<(), TlsError> {
            for _ in 0..100 {
                let mut to_server = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut to_server).unwrap();
                }
                let mut to_client = Vec::new();
                for piece in to_server.chunks_mut(self.chunk) {
                    let read = self.server.read(piece, &mut self.got, &mut to_client)?;
                    self.established += usize::from(read.established);
                    self.closed |= read.peer_closed;
                }
                if to_server.is_empty() && to_client.is_empty() {
                    return Ok(());
                }
                self.give_client(&to_client);
            }
            panic!("no quiet after 100 rounds");
        }

        /// Hands the client `bytes`; returns the plaintext it read.
        fn give_client(&mut self, bytes: &[u8]) -> Vec<u8> {
            let (mut bytes, mut out) = (bytes, Vec::new());
            while !bytes.is_empty() {
                self.client.read_tls(&mut bytes).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut out);
            }
            out
        }

        /// The server seals `text`; the client reads it.
        fn server_says(&mut self, text: &[u8]) -> Vec<u8> {
            let mut wire = Vec::new();
            self.server.seal(text, &mut wire).unwrap();
            self.give_client(&wire)
        }
    }

    #[test]
    fn a_handshake_then_data_both_ways_at_any_split() {
        let acceptor = TlsAcceptor::new(files("server", false)).unwrap();
        for chunk in [1, 7, 100, 1 << 20] {
            let mut pair = Pair::new(&acceptor, client(false), chunk);
            // The client's first data rides with its Finished.
            pair.client
                .writer()
                .write_all(b"GET /ws/microservice")
                .unwrap();
            pair.pump().unwrap();
            assert!(pair.server.is_open(), "chunk {chunk}");
            assert_eq!(pair.established, 1);
            assert_eq!(pair.got, b"GET /ws/microservice", "chunk {chunk}");
            assert_eq!(pair.server_says(b"HTTP/1.1 101"), b"HTTP/1.1 101");
            // More than one record's worth each way.
            let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            pair.got.clear();
            pair.client.writer().write_all(&big).unwrap();
            pair.pump().unwrap();
            assert_eq!(pair.got, big, "chunk {chunk}");
            assert_eq!(pair.server_says(&big), big);
            assert_eq!(pair.server.held(), 0, "nothing held between whole records");
        }
    }

    #[test]
    fn an_open_connection_keeps_only_its_keys() {
        // The idle cost: the Box of keys, with its (unallocated) partial.
        assert!(
            std::mem::size_of::<Keys>() <= 240,
            "{}",
            std::mem::size_of::<Keys>()
        );
        assert_eq!(std::mem::size_of::<Session>(), 16);
    }

    #[test]
    fn key_updates_are_followed_and_answered() {
        let acceptor = TlsAcceptor::new(files("server", false)).unwrap();
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        for round in 0..3 {
            // rustls' client sends KeyUpdate with update_requested.
            pair.client.refresh_traffic_keys().unwrap();
            pair.client.writer().write_all(b"after the update").unwrap();
            pair.got.clear();
            pair.pump().unwrap();
            assert_eq!(pair.got, b"after the update", "round {round}");
            // Our answer moved our keys too: the client reads what follows.
            assert_eq!(pair.server_says(b"ours too"), b"ours too", "round {round}");
        }
    }

    #[test]
    fn a_flood_of_key_updates_is_refused_and_our_keys_move_on_by_themselves() {
        let acceptor = TlsAcceptor::new(files("server", false)).unwrap();
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        for _ in 0..MAX_KEY_UPDATES {
            pair.client.refresh_traffic_keys().unwrap();
            pair.pump().unwrap();
        }
        // Data in between starts the count again.
        pair.client.writer().write_all(b"data").unwrap();
        pair.pump().unwrap();
        for _ in 0..MAX_KEY_UPDATES {
            pair.client.refresh_traffic_keys().unwrap();
            pair.pump().unwrap();
        }
        pair.client.refresh_traffic_keys().unwrap();
        assert!(matches!(pair.pump(), Err(TlsError::Unexpected(_))));

        // At the end of a key's record budget we update ours; the client
        // follows and reads on, through several generations.
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        for i in 0..(3 * TX_KEY_UPDATE_AT + 5) {
            let text = format!("record {i}");
            assert_eq!(pair.server_says(text.as_bytes()), text.as_bytes());
        }
        let State::Open(keys) = &pair.server.0 else {
            panic!("open")
        };
        assert!(keys.tx.seq < TX_KEY_UPDATE_AT, "the keys moved on");
    }

    #[test]
    fn close_notify_ends_the_stream_and_tampering_is_refused() {
        let acceptor = TlsAcceptor::new(files("server", false)).unwrap();
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        pair.client.send_close_notify();
        pair.pump().unwrap();
        assert!(pair.closed);

        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        pair.client.writer().write_all(b"hello").unwrap();
        let mut record = Vec::new();
        pair.client.write_tls(&mut record).unwrap();
        let last = record.len() - 1;
        record[last] ^= 1;
        let (mut plain, mut wire) = (Vec::new(), Vec::new());
        assert!(matches!(
            pair.server.read(&mut record, &mut plain, &mut wire),
            Err(TlsError::BadRecord)
        ));
        assert!(plain.is_empty());
        // A record header past the protocol's bound, before its body comes.
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        pair.pump().unwrap();
        let mut huge = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
        assert!(matches!(
            pair.server.read(&mut huge, &mut plain, &mut wire),
            Err(TlsError::RecordTooLong)
        ));
    }

    #[test]
    fn client_certificates_are_checked_when_asked_and_reloads_change_new_handshakes() {
        let acceptor = TlsAcceptor::new(files("server", true)).unwrap();
        let mut pair = Pair::new(&acceptor, client(false), 1 << 20);
        assert!(
            matches!(pair.pump(), Err(TlsError::Handshake(_))),
            "no client cert"
        );
        let mut pair = Pair::new(&acceptor, client(true), 1 << 20);
        pair.pump().unwrap();
        assert!(pair.server.is_open());

        // A reload: the files now hold the second certificate.
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        };
        std::fs::copy(keys_dir().join("server.pem"), &live.cert).unwrap();
        std::fs::copy(keys_dir().join("server.key"), &live.key).unwrap();
        let acceptor = TlsAcceptor::new(live.clone()).unwrap();
        let subject = |pair: &Pair| {
            let cert = &pair.client.peer_certificates().unwrap()[0];
            String::from_utf8_lossy(cert.as_ref()).contains("reloaded")
        };
        let mut before = Pair::new(&acceptor, client(false), 1 << 20);
        before.pump().unwrap();
        assert!(!subject(&before));
        std::fs::copy(keys_dir().join("server2.pem"), &live.cert).unwrap();
        std::fs::copy(keys_dir().join("server2.key"), &live.key).unwrap();
        acceptor.reload().unwrap();
        let mut after = Pair::new(&acceptor, client(false), 1 << 20);
        after.pump().unwrap();
        assert!(subject(&after), "new handshakes get the new certificate");
        // The connection made before keeps working.
        assert_eq!(before.server_says(b"still here"), b"still here");
        // A broken file leaves the config in use alone.
        std::fs::write(&live.key, "not a key").unwrap();
        assert!(acceptor.reload().is_err());
        let mut still = Pair::new(&acceptor, client(false), 1 << 20);
        still.pump().unwrap();
        assert!(still.server.is_open());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
