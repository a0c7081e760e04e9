//! Transfer tokens: a bearer token scoped to one transfer id, one direction
//! (upload or download) and an expiry, signed with HMAC-SHA256 under a key
//! (the agent token). The format is
//! `v1.<id>.<up|down>.<expires unix seconds>.<base64url signature>`; the
//! signature covers everything before its dot. Ids never contain a dot
//! (see [`super::store::validate_id`]), so the parts split cleanly.
//! Signatures are checked in constant time (`hmac`'s `verify_slice`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::store::validate_id;

type HmacSha256 = Hmac<Sha256>;

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// tus: create, send, query and terminate the upload.
    Upload,
    /// GET the completed file.
    Download,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upload => "up",
            Direction::Download => "down",
        }
    }

    fn parse(s: &str) -> Option<Direction> {
        match s {
            "up" => Some(Direction::Upload),
            "down" => Some(Direction::Download),
            _ => None,
        }
    }
}

/// Why a token was refused. [`TokenError::is_forbidden`] tells 403 (a
/// valid token for something else) from 401 (no valid token at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no transfer token (Authorization: Bearer <token>)")]
    Missing,
    #[error("malformed transfer token")]
    Malformed,
    #[error("transfer token signature does not verify")]
    BadSignature,
    #[error("transfer token expired")]
    Expired,
    #[error("transfer token is for transfer `{token}`, not `{requested}`")]
    WrongId { token: String, requested: String },
    #[error("transfer token allows {token}, not {requested}")]
    WrongDirection {
        token: &'static str,
        requested: &'static str,
    },
}

impl TokenError {
    /// True for a genuine token used outside its scope (HTTP 403).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            TokenError::WrongId { .. } | TokenError::WrongDirection { .. }
        )
    }
}

/// The verified content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub id: String,
    pub direction: Direction,
    pub expires: u64,
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC takes any key length")
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A token for `id` and `direction` valid until `expires`. `id` must be a
/// valid transfer id (checked: an invalid one could never be used).
pub fn sign(
    key: &[u8],
    id: &str,
    direction: Direction,
    expires: SystemTime,
) -> Result<String, super::store::IdError> {
    validate_id(id)?;
    let body = format!("v1.{id}.{}.{}", direction.as_str(), unix(expires));
    let mut m = mac(key);
    m.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    Ok(format!("{body}.{sig}"))
}

/// Checks the signature and expiry of `token` and returns its claims,
/// whatever transfer they are for.
pub fn decode(key: &[u8], token: &str, now: SystemTime) -> Result<Claims, TokenError> {
    let (body, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let mut m = mac(key);
    m.update(body.as_bytes());
    m.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let mut parts = body.split('.');
    let (Some("v1"), Some(id), Some(dir), Some(exp), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let direction = Direction::parse(dir).ok_or(TokenError::Malformed)?;
    let expires: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
    if validate_id(id).is_err() {
        return Err(TokenError::Malformed);
    }
    if unix(now) >= expires {
        return Err(TokenError::Expired);
    }
    Ok(Claims {
        id: id.to_owned(),
        direction,
        expires,
    })
}

/// Checks `token` for transfer `id` in `direction` at `now`.
pub fn verify(
    key: &[u8],
    token: &str,
    id: &str,
    direction: Direction,
    now: SystemTime,
) -> Result<Claims, TokenError> {
    let claims = decode(key, token, now)?;
    if claims.id != id {
        return Err(TokenError::WrongId {
            token: claims.id,
            requested: id.to_owned(),
        });
    }
    check_direction(&claims, direction)?;
    Ok(claims)
}

/// Checks that `claims` allow `direction`.
pub fn check_direction(claims: &Claims, direction: Direction) -> Result<(), TokenError> {
    if claims.direction != direction {
        return Err(TokenError::WrongDirection {
            token: claims.direction.as_str(),
            requested: direction.as_str(),
        });
    }
    Ok(())
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let v = header.ok_or(TokenError::Missing)?;
    let (scheme, token) = v.trim().split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"agent-token";

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    #[test]
    fn round_trip() {
        let t = sign(KEY, "job-7_out", Direction::Upload, later()).unwrap();
        let c = verify(KEY, &t, "job-7_out", Direction::Upload, SystemTime::now()).unwrap();
        assert_eq!(c.id, "job-7_out");
        assert_eq!(c.direction, Direction::Upload);
    }

    #[test]
    fn other_key_id_direction_and_expiry_are_refused() {
        let now = SystemTime::now();
        let t = sign(KEY, "a1", Direction::Download, later()).unwrap();
        assert_eq!(
            verify(b"other", &t, "a1", Direction::Download, now),
            Err(TokenError::BadSignature)
        );
        let e = verify(KEY, &t, "a2", Direction::Download, now).unwrap_err();
        assert!(e.is_forbidden(), "{e}");
        let e = verify(KEY, &t, "a1", Direction::Upload, now).unwrap_err();
        assert!(matches!(e, TokenError::WrongDirection { .. }), "{e}");
        let past = sign(KEY, "a1", Direction::Download, now - Duration::from_secs(1)).unwrap();
        assert_eq!(
            verify(KEY, &past, "a1", Direction::Download, now),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let t = sign(KEY, "a1", Direction::Download, later()).unwrap();
        // Swap the direction: the signature no longer covers the body.
        let forged = t.replacen(".down.", ".up.", 1);
        assert_eq!(
            decode(KEY, &forged, SystemTime::now()),
            Err(TokenError::BadSignature)
        );
        // Extend the expiry.
        let (body, sig) = t.rsplit_once('.').unwrap();
        let (head, _) = body.rsplit_once('.').unwrap();
        let forged = format!("{head}.99999999999.{sig}");
        assert_eq!(
            decode(KEY, &forged, SystemTime::now()),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "x", "v1.a.up.1", "v1.a.up.1.!!!", "...."] {
            assert!(decode(KEY, junk, SystemTime::now()).is_err(), "{junk}");
        }
    }

    #[test]
    fn invalid_ids_cannot_be_signed() {
        assert!(sign(KEY, "../x", Direction::Upload, later()).is_err());
        assert!(sign(KEY, "a.b", Direction::Upload, later()).is_err());
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(TokenError::Malformed));
    }
}
