//! Bearer-token check for the admin API, in constant time. A rejected
//! request gets 401, `WWW-Authenticate: Bearer` and a JSON error that never
//! repeats what the client sent.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use secrecy::{ExposeSecret, SecretString};

use super::ErrorBody;

/// The configured token; `None` means open (loopback-only, see `check_listen`).
#[derive(Clone)]
pub(crate) struct Auth {
    pub(crate) token: Option<Arc<SecretString>>,
}

impl Auth {
    /// Does this request carry the configured token (or is none configured)?
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .unwrap_or_default();
        ct_eq(expected.expose_secret().as_bytes(), given)
    }
}

/// The credentials of an `Authorization: Bearer <token>` value (the scheme
/// is case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Compares `given` with `expected` in time that depends only on
/// `expected.len()`, never on where the bytes differ.
fn ct_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(!e);
    }
    std::hint::black_box(diff) == 0
}

/// Middleware: lets the request through or answers 401.
pub(crate) async fn require_token(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if auth.allows(req.headers()) {
        return next.run(req).await;
    }
    tracing::debug!(path = %req.uri().path(), "admin request without a valid bearer token");
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        Json(ErrorBody {
            error: "missing or invalid bearer token".into(),
        }),
    )
        .into_response();
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_matches_only_identical_bytes() {
        assert!(ct_eq(b"s3cret", b"s3cret"));
        assert!(!ct_eq(b"s3cret", b"s3cre"));
        assert!(!ct_eq(b"s3cret", b"s3cret!"));
        assert!(!ct_eq(b"s3cret", b"S3cret"));
        assert!(!ct_eq(b"s3cret", b""));
        // A given token that is the bitwise complement must not match by padding.
        assert!(!ct_eq(b"a", &[]));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_trimmed() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
