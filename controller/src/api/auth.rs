//! Bearer-token authentication with roles for the whole HTTP API. [`Auth`]
//! holds the tokens of `[auth]` ([`AuthConfig`]); [`Access::of`] says which
//! roles a route admits; [`require_role`] is the middleware that checks
//! every routed request against both before its handler runs.
//!
//! | role | tokens | may call |
//! |---|---|---|
//! | `submit` | `auth.submit_tokens` | `/v1/jobs*`: submit, list, get, cancel, events, results |
//! | `agent` | `auth.agent_token` | `/v1/agents/*`: register, heartbeat, completions, release; pull mode's `/v1/leases`, `/v1/leases/*` and `/v1/subtasks/*` |
//! | `admin` | `auth.admin_tokens` | everything: the above, `GET /v1/hosts`, `GET /metrics` |
//! | anyone | — | `GET /openapi.json` |
//!
//! `/metrics` is admin-only: it shows job and host activity and request
//! counts; a Prometheus scraper gets an admin token (`authorization:
//! {credentials_file: …}` in its scrape config). Routes the table does not
//! name are admin-only, so a new route is closed until someone opens it.
//!
//! With no token configured at all the API is open (tests, demos; config
//! validation refuses that unless `listen` is a loopback address, and
//! [`serve`](super::serve) logs a warning). Otherwise:
//!
//! - no `Authorization: Bearer …` header, or a token that is no role's:
//!   401 `unauthorized` with `WWW-Authenticate: Bearer`;
//! - a token of a role the route does not admit: 403 `forbidden`.
//!
//! Tokens are compared in constant time (the `subtle` crate), always
//! against every configured token, so the time taken says nothing about
//! which token or role came close. Lengths are not hidden; tokens are
//! random strings of which the length is no secret.

use std::fmt;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::AuthConfig;

/// Who a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Researchers: the job routes.
    Submit,
    /// Operators: every route.
    Admin,
    /// Agents: the agent plane.
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Anyone, token or not.
    Public,
    /// The submit or the admin role.
    Submit,
    /// The agent or the admin role.
    Agent,
    /// The admin role only.
    Admin,
}

impl Access {
    /// The access rule of the route whose pattern (or path) is `route`
    /// (`/v1/jobs/{id}`); the same for every method. The table is in the
    /// module header; anything it does not name is admin-only.
    pub fn of(route: &str) -> Access {
        match route {
            "/openapi.json" => Access::Public,
            "/v1/jobs" => Access::Submit,
            r if r.starts_with("/v1/jobs/") => Access::Submit,
            r if r.starts_with("/v1/agents/") => Access::Agent,
            // Pull mode: leases, renewals, completions by subtask.
            "/v1/leases" => Access::Agent,
            r if r.starts_with("/v1/leases/") => Access::Agent,
            r if r.starts_with("/v1/subtasks/") => Access::Agent,
            _ => Access::Admin,
        }
    }

    /// The roles this access admits.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Access::Public => &[Role::Submit, Role::Admin, Role::Agent],
            Access::Submit => &[Role::Submit, Role::Admin],
            Access::Agent => &[Role::Agent, Role::Admin],
            Access::Admin => &[Role::Admin],
        }
    }

    /// True when `role` may call a route with this access.
    pub fn admits(self, role: Role) -> bool {
        self.roles().contains(&role)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token (401).
    #[error("this route needs a bearer token ({wanted}): Authorization: Bearer <token>")]
    Missing { wanted: String },
    /// A token that is no role's (401).
    #[error("the bearer token is not one this controller knows")]
    WrongToken,
    /// A known token of a role the route does not admit (403).
    #[error("the {role} role may not call this route; it needs {wanted}")]
    Forbidden { role: Role, wanted: String },
}

impl AuthError {
    /// True for 401 (as opposed to 403).
    pub fn is_unauthorized(&self) -> bool {
        !matches!(self, AuthError::Forbidden { .. })
    }
}

/// "the submit or admin token" for the error messages.
fn wanted(access: Access) -> String {
    let names: Vec<&str> = access.roles().iter().map(|r| r.as_str()).collect();
    format!("the {} token", names.join(" or "))
}

/// The configured tokens by role. Never prints them.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Vec<(Role, Vec<u8>)>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Auth {
    /// The tokens of `config` (which should have been validated: distinct
    /// tokens).
    pub fn new(config: &AuthConfig) -> Auth {
        let mut tokens = Vec::new();
        if let Some(t) = &config.agent_token {
            tokens.push((Role::Agent, t.as_bytes().to_vec()));
        }
        for t in &config.submit_tokens {
            tokens.push((Role::Submit, t.as_bytes().to_vec()));
        }
        for t in &config.admin_tokens {
            tokens.push((Role::Admin, t.as_bytes().to_vec()));
        }
        Auth { tokens }
    }

    /// True when no token is configured: every route is open.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The role of `presented`, comparing it with every token in constant
    /// time (no early exit, so which token matched does not show in the
    /// time taken).
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let presented = presented.as_bytes();
        let mut found = None;
        for (role, token) in &self.tokens {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(*role);
            }
        }
        found
    }

    /// Checks the bearer token in `headers` against `access`: the caller's
    /// role, `None` for an open API or a public route without a token.
    pub fn check(&self, access: Access, headers: &HeaderMap) -> Result<Option<Role>, AuthError> {
        if self.is_open() || access == Access::Public {
            return Ok(None);
        }
        let Some(presented) = bearer(headers) else {
            return Err(AuthError::Missing {
                wanted: wanted(access),
            });
        };
        let Some(role) = self.role_of(presented) else {
            return Err(AuthError::WrongToken);
        };
        if access.admits(role) {
            Ok(Some(role))
        } else {
            Err(AuthError::Forbidden {
                role,
                wanted: wanted(access),
            })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme
/// case-insensitive), if the request has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Most of a refused request's body read (and dropped) before answering.
const DRAIN_LIMIT: usize = 64 * 1024;
/// Longest wait for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Middleware on every route: refuses the request (401/403) unless its
/// bearer token's role may call the matched route ([`Access::of`] its
/// pattern). Unrouted paths never get here and answer 404 as before.
///
/// A refused request's body (up to [`DRAIN_LIMIT`], for at most
/// [`DRAIN_TIMEOUT`]) is read before the answer: hyper closes a connection
/// whose request body was not read, and a client still writing its body
/// (an agent's heartbeat with a stale token) would see a broken pipe
/// instead of the 401.
pub async fn require_role(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let access = match req.extensions().get::<MatchedPath>() {
        Some(p) => Access::of(p.as_str()),
        None => Access::of(req.uri().path()),
    };
    match s.auth.check(access, req.headers()) {
        Ok(_) => next.run(req).await,
        Err(e) => {
            let body = req.into_body();
            let _ =
                tokio::time::timeout(DRAIN_TIMEOUT, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
            ApiError::from(e).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth() -> Auth {
        Auth::new(&AuthConfig {
            agent_token: Some("agent-token-1".into()),
            submit_tokens: vec!["submit-token-1".into(), "submit-token-2".into()],
            admin_tokens: vec!["admin-token-1".into()],
        })
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn routes_map_to_access() {
        assert_eq!(Access::of("/openapi.json"), Access::Public);
        assert_eq!(Access::of("/v1/jobs"), Access::Submit);
        assert_eq!(Access::of("/v1/jobs/{id}/results"), Access::Submit);
        assert_eq!(Access::of("/v1/agents/heartbeat"), Access::Agent);
        assert_eq!(Access::of("/v1/hosts"), Access::Admin);
        assert_eq!(Access::of("/v1/leases"), Access::Agent);
        assert_eq!(Access::of("/v1/leases/renew"), Access::Agent);
        assert_eq!(
            Access::of("/v1/subtasks/{job}/{index}/complete"),
            Access::Agent
        );
        assert_eq!(Access::of("/metrics"), Access::Admin);
        // Look-alikes and new routes are admin-only.
        assert_eq!(Access::of("/v1/jobsx"), Access::Admin);
        assert_eq!(Access::of("/v1/agents"), Access::Admin);
        assert_eq!(Access::of("/v1/something-new"), Access::Admin);
    }

    #[test]
    fn roles_and_tokens() {
        let a = auth();
        assert_eq!(a.role_of("submit-token-2"), Some(Role::Submit));
        assert_eq!(a.role_of("admin-token-1"), Some(Role::Admin));
        assert_eq!(a.role_of("agent-token-1"), Some(Role::Agent));
        assert_eq!(a.role_of("agent-token-"), None);
        assert_eq!(a.role_of("agent-token-12"), None);
        assert_eq!(a.role_of(""), None);
        assert!(!format!("{a:?}").contains("token-1"));
    }

    #[test]
    fn check_gives_401_403_and_roles() {
        let a = auth();
        let none = HeaderMap::new();
        assert!(matches!(
            a.check(Access::Submit, &none),
            Err(AuthError::Missing { .. })
        ));
        assert!(matches!(
            a.check(Access::Submit, &headers("Bearer")),
            Err(AuthError::Missing { .. })
        ));
        assert!(matches!(
            a.check(Access::Submit, &headers("Basic c3VibWl0LXRva2VuLTE=")),
            Err(AuthError::Missing { .. })
        ));
        assert_eq!(
            a.check(Access::Submit, &headers("Bearer nope-nope-nope")),
            Err(AuthError::WrongToken)
        );
        assert_eq!(
            a.check(Access::Submit, &headers("bearer submit-token-1")),
            Ok(Some(Role::Submit))
        );
        assert_eq!(
            a.check(Access::Submit, &headers("Bearer admin-token-1")),
            Ok(Some(Role::Admin))
        );
        let e = a
            .check(Access::Submit, &headers("Bearer agent-token-1"))
            .unwrap_err();
        assert!(!e.is_unauthorized());
        assert!(e.to_string().contains("submit or admin"), "{e}");
        assert!(a
            .check(Access::Admin, &headers("Bearer submit-token-1"))
            .is_err());
        assert_eq!(
            a.check(Access::Agent, &headers("Bearer admin-token-1")),
            Ok(Some(Role::Admin))
        );
        assert_eq!(a.check(Access::Public, &none), Ok(None));
        // Open: everything passes without a token.
        let open = Auth::new(&AuthConfig::default());
        assert!(open.is_open());
        assert_eq!(open.check(Access::Admin, &none), Ok(None));
    }
}
