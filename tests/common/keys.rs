//! Signing keys for test tokens: the RS256 test key (tests/keys) as an
//! encoding key and its JWK.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// The RS256 test key, and its public JWK under `kid`.
pub fn rs256_key(kid: &str) -> (EncodingKey, Value) {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/keys/rs256-test.pem"
    ))
    .unwrap();
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                     "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())});
    (EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(), jwk)
}

pub fn rs256(key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    encode(&header, claims, key).unwrap()
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
