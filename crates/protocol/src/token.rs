//! Connection tokens: JWT signed with HS256 by the backend.
//!
//! Every backend language has a JWT library, so the backend mints a token
//! with the shared secret (`token_secret`) and the browser presents it
//! (`?token=` on the WebSocket URL, or a `connect` command). Claims:
//!
//! | claim | meaning |
//! |---|---|
//! | `sub` | the user id (required; letters, digits, `_ - . : @ / = #`, at most 128 bytes) |
//! | `exp` | expiry, Unix seconds (optional; honoured strictly) |
//! | `nbf` | not before, Unix seconds (optional) |
//! | `iat` | issued at, Unix seconds (optional; compared with admin `DISCONNECT … revoke_before`) |
//! | `channels` | grants for private channels: names, or prefixes ending in `*` (optional) |
//! | `info` | any JSON value the backend attaches to the connection, passed back in its calls to the backend (optional; at most `INFO_BYTES_MAX` bytes) |
//!
//! Only `alg: HS256` is accepted (never `none`). During a secret rotation
//! the previous secret (`token_secret_previous`) is accepted too.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::client::name_byte_allowed;

/// Longest token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Longest user id.
pub const USER_ID_BYTES_MAX: usize = 128;
/// Most channel grants in one token.
pub const GRANTS_MAX: usize = 256;
/// Largest `info` claim, as JSON text.
pub const INFO_BYTES_MAX: usize = 2048;

/// Who a connection is, once its token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    /// Unix seconds; the connection is closed with 4002 when it passes.
    pub expires_at_s: Option<u64>,
    /// Unix seconds (0 when the token had no `iat`).
    pub issued_at_s: u64,
    /// Private channels this token grants: exact names, or prefixes
    /// (stored without the trailing `*`) in `grant_prefixes`.
    pub grants: Box<[Box<str>]>,
    pub grant_prefixes: Box<[Box<str>]>,
    /// The `info` claim, as JSON text (passed to the backend with calls).
    pub info: Option<Box<str>>,
}

impl Identity {
    /// Whether the token grants `channel`.
    pub fn grants(&self, channel: &str) -> bool {
        self.grants.iter().any(|g| &**g == channel) || self.grant_prefixes.iter().any(|p| channel.starts_with(&**p))
    }
}

/// Why a token was refused. Each has a stable code for clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No secret is configured, so no token can be verified.
    NotConfigured,
    Malformed(&'static str),
    BadSignature,
    UnsupportedAlgorithm,
    Expired,
    NotYetValid,
    BadSubject,
    /// Issued before the user's `revoke_before` (admin DISCONNECT).
    Revoked,
}

impl TokenError {
    pub fn message(self) -> &'static str {
        match self {
            TokenError::NotConfigured => "tokens are not enabled on this server (no token_secret)",
            TokenError::Malformed(why) => why,
            TokenError::BadSignature => "token signature does not match",
            TokenError::UnsupportedAlgorithm => "token algorithm must be HS256",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not valid yet (nbf)",
            TokenError::BadSubject => "token sub must be 1-128 bytes of letters, digits and _ - . : @ / = #",
            TokenError::Revoked => "token revoked",
        }
    }

    pub fn is_expired(self) -> bool {
        self == TokenError::Expired
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: &'a str,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
}

/// Verifies tokens against the current and previous secrets.
#[derive(Clone)]
pub struct Verifier {
    secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} secrets)", self.secrets.len())
    }
}

fn decode_part(part: &str) -> Result<Vec<u8>, TokenError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("token is not base64url"))
}

impl Verifier {
    pub fn new(current: Option<&str>, previous: Option<&str>) -> Verifier {
        let secrets = [current, previous].into_iter().flatten().map(|s| s.as_bytes().to_vec()).collect();
        Verifier { secrets }
    }

    pub fn is_enabled(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Checks `token` at `now_s` (Unix seconds).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Identity, TokenError> {
        if self.secrets.is_empty() {
            return Err(TokenError::NotConfigured);
        }
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed("token too long"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("token must have three dot-separated parts"));
        };
        let header_bytes = decode_part(header)?;
        let header_json: Header<'_> =
            serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed("token header is not JSON"))?;
        if header_json.alg != "HS256" {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        let signature = decode_part(signature)?;
        let signed = &token[..header.len() + 1 + payload.len()];
        let valid = self.secrets.iter().any(|secret| {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
            mac.update(signed.as_bytes());
            mac.verify_slice(&signature).is_ok()
        });
        if !valid {
            return Err(TokenError::BadSignature);
        }
        let claims: Claims = serde_json::from_slice(&decode_part(payload)?)
            .map_err(|_| TokenError::Malformed("token claims are not valid"))?;
        let user = match claims.sub {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(TokenError::BadSubject),
        };
        if user.is_empty() || user.len() > USER_ID_BYTES_MAX || !user.bytes().all(name_byte_allowed) {
            return Err(TokenError::BadSubject);
        }
        let seconds = |value: f64| if value.is_finite() && value > 0.0 { value as u64 } else { 0 };
        let expires_at_s = claims.exp.map(seconds);
        if expires_at_s.is_some_and(|exp| now_s >= exp) {
            return Err(TokenError::Expired);
        }
        if claims.nbf.map(seconds).is_some_and(|nbf| now_s < nbf) {
            return Err(TokenError::NotYetValid);
        }
        let info = claims.info.map(|info| info.get().into());
        Identity::from_parts(user, expires_at_s, claims.iat.map(seconds).unwrap_or(0), claims.channels, info)
    }
}

impl Identity {
    /// An identity from its parts (a token's claims, or a backend's answer
    /// to a connect proxy): the user id is checked like a token's `sub`,
    /// channel grants ending in `*` are prefixes; `info` is JSON text.
    pub fn from_parts(
        user: String,
        expires_at_s: Option<u64>,
        issued_at_s: u64,
        channels: Vec<String>,
        info: Option<Box<str>>,
    ) -> Result<Identity, TokenError> {
        if user.is_empty() || user.len() > USER_ID_BYTES_MAX || !user.bytes().all(name_byte_allowed) {
            return Err(TokenError::BadSubject);
        }
        if channels.len() > GRANTS_MAX {
            return Err(TokenError::Malformed("too many channel grants"));
        }
        if info.as_ref().is_some_and(|info| info.len() > INFO_BYTES_MAX) {
            return Err(TokenError::Malformed("info claim over 2048 bytes"));
        }
        let (prefixes, names): (Vec<String>, Vec<String>) = channels.into_iter().partition(|g| g.ends_with('*'));
        Ok(Identity {
            user: user.into(),
            expires_at_s,
            issued_at_s,
            grants: names.into_iter().map(String::into_boxed_str).collect(),
            grant_prefixes: prefixes
                .into_iter()
                .map(|p| p.trim_end_matches('*').to_string().into_boxed_str())
                .collect(),
            // JSON null is no info.
            info: info.filter(|info| &**info != "null"),
        })
    }
}

/// Mints a token (for tests, the load generator and the CLI's `token` helper).
pub fn sign(secret: &str, claims: &serde_json::Value) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = engine.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", engine.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn rfc7519_style_token_from_another_library_verifies() {
        // Made with PyJWT: jwt.encode({"sub": "42", "exp": 4102444800}, "0123456789abcdef0123", "HS256")
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiIsImV4cCI6NDEwMjQ0NDgwMH0._BysvuILFQyYEvnDy0mqGpDb-f3qZNgJUdF--N4llQ4";
        let verifier = Verifier::new(Some(SECRET), None);
        let identity = verifier.verify(token, 1_700_000_000).unwrap();
        assert_eq!(&*identity.user, "42");
        assert_eq!(identity.expires_at_s, Some(4_102_444_800));
    }

    #[test]
    fn round_trip_and_grants() {
        let token = sign(SECRET, &json!({"sub": "alice", "iat": 100, "channels": ["private_a", "private_team_*"]}));
        let identity = Verifier::new(Some(SECRET), None).verify(&token, 1_000).unwrap();
        assert_eq!(&*identity.user, "alice");
        assert_eq!(identity.issued_at_s, 100);
        assert!(identity.grants("private_a"));
        assert!(identity.grants("private_team_7"));
        assert!(!identity.grants("private_b"));
    }

    #[test]
    fn the_info_claim_is_kept_as_json_and_bounded() {
        let verifier = Verifier::new(Some(SECRET), None);
        let token = sign(SECRET, &json!({"sub": "a", "info": {"name": "Ann", "n": [1, 2]}}));
        let info = verifier.verify(&token, 0).unwrap().info.expect("info kept");
        let info: serde_json::Value = serde_json::from_str(&info).expect("JSON text");
        assert_eq!(info, json!({"name": "Ann", "n": [1, 2]}));
        assert_eq!(verifier.verify(&sign(SECRET, &json!({"sub": "a", "info": null})), 0).unwrap().info, None);
        let big = sign(SECRET, &json!({"sub": "a", "info": "x".repeat(INFO_BYTES_MAX)}));
        assert!(matches!(verifier.verify(&big, 0), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn numeric_subjects_are_strings() {
        let token = sign(SECRET, &json!({"sub": 42}));
        assert_eq!(&*Verifier::new(Some(SECRET), None).verify(&token, 0).unwrap().user, "42");
    }

    #[test]
    fn refusals() {
        let verifier = Verifier::new(Some(SECRET), None);
        let expired = sign(SECRET, &json!({"sub": "a", "exp": 1000}));
        assert_eq!(verifier.verify(&expired, 1000).unwrap_err(), TokenError::Expired);
        assert!(verifier.verify(&expired, 999).is_ok());
        let early = sign(SECRET, &json!({"sub": "a", "nbf": 2000}));
        assert_eq!(verifier.verify(&early, 1000).unwrap_err(), TokenError::NotYetValid);
        let other = sign("another-secret-entirely", &json!({"sub": "a"}));
        assert_eq!(verifier.verify(&other, 0).unwrap_err(), TokenError::BadSignature);
        let mut tampered = sign(SECRET, &json!({"sub": "a"}));
        tampered.insert(tampered.find('.').unwrap() + 2, 'x');
        assert!(verifier.verify(&tampered, 0).is_err());
        assert_eq!(
            verifier.verify("a.b", 0).unwrap_err(),
            TokenError::Malformed("token must have three dot-separated parts")
        );
        assert!(matches!(verifier.verify("!!!.???.***", 0).unwrap_err(), TokenError::Malformed(_)));
        let no_sub = sign(SECRET, &json!({"exp": 9_999_999_999u64}));
        assert_eq!(verifier.verify(&no_sub, 0).unwrap_err(), TokenError::BadSubject);
        let bad_sub = sign(SECRET, &json!({"sub": "a b"}));
        assert_eq!(verifier.verify(&bad_sub, 0).unwrap_err(), TokenError::BadSubject);
        assert_eq!(Verifier::new(None, None).verify(&bad_sub, 0).unwrap_err(), TokenError::NotConfigured);
        assert!(verifier.verify(&"x".repeat(TOKEN_BYTES_MAX + 1), 0).is_err());
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!("{}.{}.", engine.encode(br#"{"alg":"none"}"#), engine.encode(br#"{"sub":"a"}"#));
        assert_eq!(Verifier::new(Some(SECRET), None).verify(&none, 0).unwrap_err(), TokenError::UnsupportedAlgorithm);
        let hs512 = format!("{}.{}.AAAA", engine.encode(br#"{"alg":"HS512"}"#), engine.encode(br#"{"sub":"a"}"#));
        assert_eq!(Verifier::new(Some(SECRET), None).verify(&hs512, 0).unwrap_err(), TokenError::UnsupportedAlgorithm);
    }

    #[test]
    fn previous_secret_accepted_during_rotation() {
        let old = sign("the-old-secret-0000", &json!({"sub": "a"}));
        assert!(Verifier::new(Some(SECRET), Some("the-old-secret-0000")).verify(&old, 0).is_ok());
        assert_eq!(Verifier::new(Some(SECRET), None).verify(&old, 0).unwrap_err(), TokenError::BadSignature);
    }
}
