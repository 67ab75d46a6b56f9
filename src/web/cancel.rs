//! Who may cancel a job over REST: the holder of a token derived from the
//! cluster secret.
//!
//! Everything else the REST API serves is read-only. `POST
//! /jobs/{id}/cancel` changes the cluster, so it needs `Authorization:
//! Bearer <token>`, the token being HMAC-SHA256(cluster secret,
//! [`TOKEN_CONTEXT`]) in hex ([`cancel_token`]). Like the Flight token, it
//! proves knowledge of the secret without sending it, and its own label
//! keeps a leaked Flight token (or this one) from opening the other plane.
//! It is compared in constant time. Without a cluster secret there is no
//! token to ask for, and cancelling over REST is disabled: a cluster
//! without a secret serves on loopback only for its control plane, but its
//! REST port may still be reachable, and an unauthenticated cancel would
//! let anyone who can reach it stop jobs.

use axum::http::{HeaderMap, StatusCode, header};

use crate::security::ClusterSecret;

/// What the cancel token is derived from.
pub const TOKEN_CONTEXT: &[u8] = b"strata-rest-cancel-v1";

/// The token that authorizes `POST /jobs/{id}/cancel`: HMAC-SHA256(secret,
/// "strata-rest-cancel-v1") as 64 hex digits.
pub fn cancel_token(secret: &ClusterSecret) -> String {
    secret.mac_hex(TOKEN_CONTEXT)
}

/// Why a cancel request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "cancelling jobs over REST is disabled: this cluster has no secret \
         (set security.auth.secret, security.auth.secret-file or STRATA_AUTH_SECRET)"
    )]
    Disabled,
    #[error(
        "cancelling a job needs 'Authorization: Bearer <token>', the token being \
         HMAC-SHA256(cluster secret, \"strata-rest-cancel-v1\") in hex"
    )]
    Missing,
    #[error(
        "wrong cancel token: use HMAC-SHA256(cluster secret, \"strata-rest-cancel-v1\") in hex"
    )]
    Wrong,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        StatusCode::FORBIDDEN
    }
}

/// Checks a request's `Authorization` header against `token` (`None`:
/// cancelling is disabled).
pub fn authorize(token: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let token = token.ok_or(Refusal::Disabled)?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(Refusal::Missing)?;
    if crate::security::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_token_is_the_secret_s_hmac_under_its_own_label() {
        let secret = ClusterSecret::from_bytes(b"0123456789abcdef").unwrap();
        let token = cancel_token(&secret);
        assert_eq!(token.len(), 64);
        assert_eq!(token, secret.mac_hex(b"strata-rest-cancel-v1"));
        assert_ne!(token, crate::flight::flight_token(&secret));
    }

    #[test]
    fn only_the_right_bearer_token_is_authorized() {
        let token = "ab".repeat(32);
        assert_eq!(
            authorize(None, &bearer(&format!("Bearer {token}"))),
            Err(Refusal::Disabled)
        );
        assert_eq!(
            authorize(Some(&token), &HeaderMap::new()),
            Err(Refusal::Missing)
        );
        assert_eq!(
            authorize(Some(&token), &bearer(&token)),
            Err(Refusal::Missing)
        );
        assert_eq!(
            authorize(Some(&token), &bearer("Bearer nope")),
            Err(Refusal::Wrong)
        );
        let short = format!("Bearer {}", &token[..63]);
        assert_eq!(
            authorize(Some(&token), &bearer(&short)),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            authorize(Some(&token), &bearer(&format!("Bearer {token}"))),
            Ok(())
        );
    }
}
