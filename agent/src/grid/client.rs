//! Blocking HTTP client of the controller's agent routes (MessagePack bodies,
//! `Authorization: Bearer <token>` when a token is set):
//! `POST /v1/agents/register`, `/v1/agents/heartbeat` and
//! `/v1/agents/completions`. Used only from the grid thread, never from the
//! async runtime.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sparegrid_proto::grid::{Completion, Heartbeat, HeartbeatReply, Register, Registered};

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
}

impl ClientError {
    /// Whether sending the same request again may succeed (network trouble,
    /// 5xx, 401, 409, 429); a 400/413/415 will not get better.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                !matches!(status, 400 | 413 | 415 | 422) && *status >= 400
            }
            _ => true,
        }
    }
}

pub struct ControllerClient {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
}

impl ControllerClient {
    /// A client of the controller at `base` (`http://host:port`); `token`
    /// empty means no `Authorization` header.
    pub fn new(base: &str, token: &str) -> Result<ControllerClient, ClientError> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| ClientError::Http {
                url: base.to_string(),
                message: e.to_string(),
            })?;
        Ok(ControllerClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    pub fn register(&self, r: &Register) -> Result<Registered, ClientError> {
        self.call("/v1/agents/register", r)
    }

    /// Sends a heartbeat; [`ClientError::MustRegister`] on a 409 `must_register`.
    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        self.call("/v1/agents/heartbeat", hb)
    }

    /// Reports finished attempts. The controller's per-completion verdicts
    /// (accepted, duplicate, stale, rejected) are not needed here.
    pub fn completions(&self, c: &[Completion]) -> Result<(), ClientError> {
        self.call::<_, serde::de::IgnoredAny>("/v1/agents/completions", &c)
            .map(|_| ())
    }

    fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
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
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        let resp = req.send().map_err(|e| ClientError::Http {
            url: url.clone(),
            message: e.to_string(),
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
