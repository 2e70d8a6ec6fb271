//! One-time tokens: each URL the CRI calls return names a token that works
//! once, for the kind of request it was issued for, until it expires.

use crate::Request;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Most URLs waiting to be used; more are refused rather than letting a
/// caller grow the daemon's memory without bound.
const MAX_PENDING: usize = 4096;

/// Why a token was not accepted, or not issued.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Never issued, already used, or expired.
    #[error("unknown, used or expired streaming token")]
    Unknown,
    /// Issued for another kind of request (an exec token on /attach).
    #[error("this token was issued for {issued}, not {used}")]
    WrongKind {
        /// The kind it was issued for.
        issued: &'static str,
        /// The kind it was used for.
        used: String,
    },
    /// Too many URLs wait to be used.
    #[error("{MAX_PENDING} streaming URLs are waiting to be used; try again later")]
    Full,
}

/// The tokens issued and not yet used.
pub struct Tokens {
    ttl: Duration,
    pending: Mutex<HashMap<String, (Instant, Request)>>,
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    if getrandom::fill(&mut b).is_err() {
        // Never once the pool is up; a predictable token would be a
        // hole, so fail closed with one nobody can match.
        return String::new();
    }
    // URL-safe without escaping.
    hex::encode(b)
}

impl Tokens {
    /// Tokens valid for `ttl`.
    pub fn new(ttl: Duration) -> Tokens {
        Tokens {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Issues a token for `req`.
    pub fn issue(&self, req: Request) -> Result<String, TokenError> {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        if pending.len() >= MAX_PENDING {
            return Err(TokenError::Full);
        }
        let token = random_token();
        if token.is_empty() {
            return Err(TokenError::Full);
        }
        pending.insert(token.clone(), (now, req));
        Ok(token)
    }

    /// Takes `token` for a request of `kind`; it is gone afterwards,
    /// whether or not it matched.
    pub fn take(&self, token: &str, kind: &str) -> Result<Request, TokenError> {
        let (at, req) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token)
            .ok_or(TokenError::Unknown)?;
        if at.elapsed() >= self.ttl {
            return Err(TokenError::Unknown);
        }
        if req.kind() != kind {
            return Err(TokenError::WrongKind {
                issued: req.kind(),
                used: kind.to_string(),
            });
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortForwardRequest;

    fn pf() -> Request {
        Request::PortForward(PortForwardRequest {
            sandbox_id: "s".into(),
            ports: vec![80],
        })
    }

    #[test]
    fn a_token_works_once() {
        let t = Tokens::new(Duration::from_secs(60));
        let token = t.issue(pf()).unwrap();
        assert_eq!(token.len(), 48);
        assert_eq!(t.take(&token, "portforward").unwrap(), pf());
        assert_eq!(t.take(&token, "portforward"), Err(TokenError::Unknown));
    }

    #[test]
    fn tokens_expire() {
        let t = Tokens::new(Duration::from_millis(20));
        let token = t.issue(pf()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(t.take(&token, "portforward"), Err(TokenError::Unknown));
    }

    #[test]
    fn a_token_is_bound_to_its_kind_and_burnt_by_misuse() {
        let t = Tokens::new(Duration::from_secs(60));
        let token = t.issue(pf()).unwrap();
        assert!(matches!(
            t.take(&token, "exec"),
            Err(TokenError::WrongKind { .. })
        ));
        assert_eq!(t.take(&token, "portforward"), Err(TokenError::Unknown));
    }

    #[test]
    fn tokens_are_distinct_and_bounded() {
        let t = Tokens::new(Duration::from_secs(60));
        let a = t.issue(pf()).unwrap();
        let b = t.issue(pf()).unwrap();
        assert_ne!(a, b);
        for _ in 2..MAX_PENDING {
            t.issue(pf()).unwrap();
        }
        assert_eq!(t.issue(pf()), Err(TokenError::Full));
    }
}
