//! Blocking HTTP client of the controller's agent routes (MessagePack bodies,
//! `Authorization: Bearer <token>` when a token is set):
//! `POST /v1/agents/register`, `/v1/agents/heartbeat`,
//! `/v1/agents/completions` and `/v1/agents/release`, and pull mode's
//! `POST /v1/leases`, `/v1/leases/renew` and
//! `/v1/subtasks/{job}/{index}/complete`. Used only from the grid threads,
//! never from the async runtime.
//!
//! `https://` controllers are reached with rustls; the server certificate
//! is checked against the Mozilla roots (webpki-roots) and, when
//! `controller.ca_cert` is set, that PEM file's certificates too (a private
//! CA or a self-signed controller).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sparegrid_proto::grid::{
    CompleteReply, Completion, Heartbeat, HeartbeatReply, LeaseGrant, LeaseRenew, LeaseRenewed,
    LeaseRequest, Register, Registered, Release, Released,
};

use crate::config::ControllerSection;

/// Why a call to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller does not know this host (409 `must_register`).
    #[error("the controller asks this agent to register again")]
    MustRegister,
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {message}")]
    Decode { url: String, message: String },
    /// `controller.ca_cert` could not be read or holds no PEM certificate.
    #[error("controller.ca_cert {path}: {message}")]
    CaCert { path: PathBuf, message: String },
}

impl ClientError {
    /// Whether sending the same request again may succeed (network trouble,
    /// 5xx, 401, 409, 429); a 400/413/415 will not get better.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                !matches!(status, 400 | 413 | 415 | 422) && *status >= 400
            }
            ClientError::CaCert { .. } => false,
            _ => true,
        }
    }

    /// A 409 `stale_epoch`: the completion's lease is no longer current.
    /// Sending it again would change nothing.
    pub fn is_stale_epoch(&self) -> bool {
        matches!(self, ClientError::Status { status: 409, body, .. } if body.contains("stale_epoch"))
    }

    /// The HTTP status the controller answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            ClientError::MustRegister => Some(409),
            _ => None,
        }
    }
}

pub struct ControllerClient {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
}

impl ControllerClient {
    /// A client of the controller `c.url` (`http://` or `https://`) with
    /// `c.token` (empty: no `Authorization` header) and `c.ca_cert` (empty:
    /// the built-in roots only).
    pub fn new(c: &ControllerSection) -> Result<ControllerClient, ClientError> {
        let base = c.url.as_str();
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .use_rustls_tls();
        if !c.ca_cert.as_os_str().is_empty() {
            for cert in ca_certs(&c.ca_cert)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Http {
            url: base.to_string(),
            message: e.to_string(),
        })?;
        Ok(ControllerClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: c.token.clone(),
        })
    }

    pub fn register(&self, r: &Register) -> Result<Registered, ClientError> {
        self.call("/v1/agents/register", r)
    }

    /// Sends a heartbeat; [`ClientError::MustRegister`] on a 409 `must_register`.
    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        self.call("/v1/agents/heartbeat", hb)
    }

    /// Reports finished attempts, waiting at most `timeout` (else the
    /// client's 15 s). The controller's per-completion verdicts (accepted,
    /// duplicate, stale, rejected) are not needed here.
    pub fn completions(
        &self,
        c: &[Completion],
        timeout: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.call_with::<_, serde::de::IgnoredAny>("/v1/agents/completions", &c, timeout)
            .map(|_| ())
    }

    /// Hands attempts back unfinished, waiting at most `timeout`.
    pub fn release(&self, r: &Release, timeout: Option<Duration>) -> Result<Released, ClientError> {
        self.call_with("/v1/agents/release", r, timeout)
    }

    /// Asks for leases (a long poll: the controller holds the request up to
    /// `req.wait_ms`), waiting at most `timeout`.
    pub fn lease(&self, req: &LeaseRequest, timeout: Duration) -> Result<LeaseGrant, ClientError> {
        self.call_with("/v1/leases", req, Some(timeout))
    }

    /// Renews leases on their own (not in a heartbeat).
    pub fn renew(&self, r: &LeaseRenew) -> Result<LeaseRenewed, ClientError> {
        self.call("/v1/leases/renew", r)
    }

    /// Completes one leased attempt; its epoch is the fencing token (a
    /// stale one is a 409, see [`ClientError::is_stale_epoch`]).
    pub fn complete(
        &self,
        c: &Completion,
        timeout: Option<Duration>,
    ) -> Result<CompleteReply, ClientError> {
        let path = format!(
            "/v1/subtasks/{}/{}/complete",
            path_segment(&c.attempt.job),
            c.attempt.index
        );
        self.call_with(&path, c, timeout)
    }

    /// The same client (connection pool, token, CA) for another agent-plane
    /// endpoint at `base` (`http://addr:port`): a migration target's routes.
    pub fn at(&self, base: &str) -> ControllerClient {
        ControllerClient {
            http: self.http.clone(),
            base: base.trim_end_matches('/').to_string(),
            token: self.token.clone(),
        }
    }

    /// `GET base + path` with a MessagePack reply.
    pub fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = self.http.get(&url);
        self.send(url, req)
    }

    /// `POST base + path` with a MessagePack body and reply.
    pub fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        timeout: Option<Duration>,
    ) -> Result<R, ClientError> {
        self.call_with(path, body, timeout)
    }

    fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        self.call_with(path, body, None)
    }

    fn call_with<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        timeout: Option<Duration>,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let bytes = rmp_serde::to_vec_named(body).map_err(|e| ClientError::Decode {
            url: url.clone(),
            message: format!("encoding the request: {e}"),
        })?;
        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/msgpack")
            .body(bytes);
        if let Some(t) = timeout {
            req = req.timeout(t.max(Duration::from_millis(50)));
        }
        self.send(url, req)
    }

    /// Sends `req` (to `url`) with the bearer token and decodes a
    /// MessagePack reply; a 409 `must_register` is
    /// [`ClientError::MustRegister`], any other failure status
    /// [`ClientError::Status`] with the start of its body.
    fn send<R: DeserializeOwned>(
        &self,
        url: String,
        mut req: reqwest::blocking::RequestBuilder,
    ) -> Result<R, ClientError> {
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        let resp = req.send().map_err(|e| ClientError::Http {
            url: url.clone(),
            message: with_causes(&e),
        })?;
        let status = resp.status();
        let body = resp.bytes().map_err(|e| ClientError::Http {
            url: url.clone(),
            message: format!("reading the reply: {e}"),
        })?;
        if status.is_success() {
            return rmp_serde::from_slice(&body).map_err(|e| ClientError::Decode {
                url,
                message: format!("the reply is not valid MessagePack: {e}"),
            });
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        if status.as_u16() == 409 && text.contains("must_register") {
            return Err(ClientError::MustRegister);
        }
        Err(ClientError::Status {
            url,
            status: status.as_u16(),
            body: text,
        })
    }
}

/// `s` as one URL path segment: job ids are `j-<n>`, but anything else is
/// percent-encoded rather than trusted (hand-written: one small function
/// instead of a crate for it).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The certificates of the PEM file `path`.
pub(crate) fn ca_certs(path: &Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let err = |message: String| ClientError::CaCert {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// `e` and its sources, joined with ": ". reqwest's own text stops at
/// "error sending request for url (…)"; the cause (refused, timed out,
/// no route) is what an operator needs.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let s = src.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = src.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_error_names_its_cause() {
        // A port nobody listens on: the connection is refused, and the
        // message must say so, not only "error sending request".
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .unwrap_err();
        let text = with_causes(&e);
        assert!(text.starts_with("error sending request"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
}
