//! [`Client`]: the blocking HTTP client the `sparegrid` CLI talks to the
//! controller with. It adds the bearer token, turns every non-2xx answer
//! into [`CliError::Api`] (the API's `{code, message, field?}` body) or
//! [`CliError::Status`] (a body that is not one), names the controller's URL
//! when it cannot be reached (or its certificate is not trusted), and reads
//! the `events` stream ([`SseReader`]). `https://` controllers are reached
//! with rustls, trusting the public web roots plus an optional private CA
//! ([`Client::with_ca_cert`]).

use std::io::{BufRead, Read};
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};

use super::CliError;
use crate::api::ErrorBody;

/// How long a short request (submit, get, list, cancel) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one controller.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
    ca_cert: Option<std::path::PathBuf>,
}

impl Client {
    /// A client of the controller at `base` (`http://host:port`, a trailing
    /// `/` is dropped), sending `token` as a bearer token when there is one.
    pub fn new(base: &str, token: Option<String>) -> Result<Client, CliError> {
        Client::with_ca_cert(base, token, None)
    }

    /// [`Client::new`] that also trusts the CA certificates in the PEM file
    /// `ca_cert` (a private CA, or the controller's self-signed
    /// certificate) for `https://` controllers.
    pub fn with_ca_cert(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Client, CliError> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CliError::Usage(format!(
                "--controller {base:?} is not an http:// or https:// URL"
            )));
        }
        // No overall timeout on the client: result bodies and event streams
        // may take long. Short requests set their own.
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(None);
        if let Some(path) = ca_cert {
            for cert in read_ca_cert(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| CliError::Http {
            url: base.clone(),
            message: error_chain(&e),
        })?;
        Ok(Client {
            base,
            token,
            http,
            ca_cert: ca_cert.map(Path::to_owned),
        })
    }

    /// An async client with the same trust (the transfer client is
    /// async); it sends no API token (transfers carry their own).
    pub fn async_http(&self) -> Result<reqwest::Client, CliError> {
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(path) = &self.ca_cert {
            for cert in read_ca_cert(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map_err(|e| CliError::Http {
            url: self.base.clone(),
            message: error_chain(&e),
        })
    }

    /// The controller's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn auth(&self, rb: RequestBuilder) -> RequestBuilder {
        match self.token.as_deref() {
            Some(t) if !t.is_empty() => rb.bearer_auth(t),
            _ => rb,
        }
    }

    /// Sends `rb` (built for `url`) and returns the response if it is 2xx.
    fn send(&self, rb: RequestBuilder, url: &str) -> Result<Response, CliError> {
        let resp = self
            .auth(rb)
            .send()
            .map_err(|e| self.transport_error(url, &e))?;
        check(resp, url)
    }

    /// Maps a transport failure: unreachable controllers name the base URL;
    /// a certificate that is not trusted says how to trust it.
    pub(crate) fn transport_error(&self, url: &str, e: &reqwest::Error) -> CliError {
        let chain = error_chain(e);
        if chain.contains("certificate") || chain.contains("UnknownIssuer") {
            return CliError::Certificate {
                url: self.base.clone(),
                message: innermost(e),
            };
        }
        if e.is_connect() {
            CliError::Connect {
                url: self.base.clone(),
                message: innermost(e),
            }
        } else {
            CliError::Http {
                url: url.to_owned(),
                message: error_chain(e),
            }
        }
    }

    /// `GET path` with the short timeout; the 2xx response.
    pub fn get(&self, path: &str) -> Result<Response, CliError> {
        let url = self.url(path);
        self.send(self.http.get(&url).timeout(REQUEST_TIMEOUT), &url)
    }

    /// `GET path` without a timeout (results bodies).
    pub fn get_stream(&self, path: &str) -> Result<Response, CliError> {
        let url = self.url(path);
        self.send(self.http.get(&url), &url)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: Vec<u8>) -> Result<Response, CliError> {
        let url = self.url(path);
        let rb = self
            .http
            .post(&url)
            .timeout(REQUEST_TIMEOUT)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        self.send(rb, &url)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Response, CliError> {
        let url = self.url(path);
        self.send(self.http.delete(&url).timeout(REQUEST_TIMEOUT), &url)
    }

    /// `GET path` as server-sent events (no timeout: the server sends
    /// keep-alives).
    pub fn events(&self, path: &str) -> Result<Response, CliError> {
        let url = self.url(path);
        let rb = self
            .http
            .get(&url)
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        self.send(rb, &url)
    }
}

/// The certificates in the PEM file at `path` (`--ca-cert`).
fn read_ca_cert(path: &Path) -> Result<Vec<reqwest::Certificate>, CliError> {
    let pem = std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| {
        CliError::Usage(format!(
            "--ca-cert {}: {message} (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        ))
    };
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(error_chain(&e)))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".to_owned()));
    }
    Ok(certs)
}

/// Reads a 2xx response's body as text, naming `url` on failure.
pub fn body_text(resp: Response, url: &str) -> Result<String, CliError> {
    resp.text().map_err(|e| CliError::Http {
        url: url.to_owned(),
        message: format!("reading the answer: {}", error_chain(&e)),
    })
}

/// Parses `text` (the body from `url`) as `T`.
pub fn decode<T: serde::de::DeserializeOwned>(text: &str, url: &str) -> Result<T, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

/// Passes 2xx responses; turns others into [`CliError::Api`] when the body
/// is the API's error body, [`CliError::Status`] otherwise.
fn check(resp: Response, url: &str) -> Result<Response, CliError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let mut bytes = Vec::new();
    // Read at most 64 KiB of an error body.
    let _ = resp.take(64 * 1024).read_to_end(&mut bytes);
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(CliError::Api {
            status: status.as_u16(),
            url: url.to_owned(),
            body,
        }),
        Err(_) => {
            let text = String::from_utf8_lossy(&bytes);
            let text: String = text.trim().chars().take(200).collect();
            Err(CliError::Status {
                status: status.as_u16(),
                url: url.to_owned(),
                body: text,
            })
        }
    }
}

/// The error and its sources, joined with `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}

/// The deepest source's message (`Connection refused (os error 111)`).
fn innermost(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        last = src.to_string();
        cur = src.source();
    }
    last
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Reads server-sent events off a byte stream (the `text/event-stream`
/// format: `field: value` lines, a blank line ends an event, `:` lines are
/// comments such as keep-alives).
#[derive(Debug)]
pub struct SseReader<R> {
    inner: R,
}

impl<R: BufRead> SseReader<R> {
    pub fn new(inner: R) -> Self {
        SseReader { inner }
    }

    /// The next event, or `None` at the end of the stream. An event cut off
    /// by the end of the stream is dropped, as the format says.
    pub fn next_event(&mut self) -> std::io::Result<Option<SseEvent>> {
        let mut event = String::new();
        let mut data: Option<String> = None;
        let mut line = String::new();
        loop {
            line.clear();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\n', '\r']);
            if l.is_empty() {
                if let Some(data) = data.take() {
                    let event = if event.is_empty() {
                        "message".to_owned()
                    } else {
                        std::mem::take(&mut event)
                    };
                    return Ok(Some(SseEvent { event, data }));
                }
                event.clear();
                continue;
            }
            if l.starts_with(':') {
                continue;
            }
            let (name, value) = match l.split_once(':') {
                Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
                None => (l, ""),
            };
            match name {
                "event" => event = value.to_owned(),
                "data" => match data.as_mut() {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_reader_parses_events_comments_and_multiline_data() {
        let text = ": keep-alive\n\nevent: progress\ndata: {\"a\":1}\n\n\
                    data: one\ndata: two\n\nevent: end\r\ndata:{}\r\n\r\nevent: cut\ndata: x\n";
        let mut r = SseReader::new(text.as_bytes());
        let e = r.next_event().unwrap().unwrap();
        assert_eq!(
            (e.event.as_str(), e.data.as_str()),
            ("progress", "{\"a\":1}")
        );
        let e = r.next_event().unwrap().unwrap();
        assert_eq!((e.event.as_str(), e.data.as_str()), ("message", "one\ntwo"));
        let e = r.next_event().unwrap().unwrap();
        assert_eq!((e.event.as_str(), e.data.as_str()), ("end", "{}"));
        assert_eq!(r.next_event().unwrap(), None);
    }

    #[test]
    fn bad_controller_urls_are_refused() {
        assert!(matches!(
            Client::new("127.0.0.1:7400", None),
            Err(CliError::Usage(_))
        ));
        let c = Client::new("http://h:1/", None).unwrap();
        assert_eq!(c.url("/v1/jobs"), "http://h:1/v1/jobs");
    }
}
