//! HTTPS for the API: `[tls]`'s PEM certificate chain and private key
//! become a rustls server config (the `ring` provider, TLS 1.2 and 1.3,
//! ALPN `h2` and `http/1.1`) served through `axum-server`. The code is the
//! transfer crate's TLS module (one copy for the agent's transfer endpoint
//! and this API); here it names the `tls.cert` and `tls.key` fields.

use std::path::Path;
use std::sync::Arc;

use sparegrid_transfer::tls::TlsFields;
pub use sparegrid_transfer::tls::{serve_tls_on, TlsError, SHUTDOWN_GRACE};

/// The API's config fields.
const FIELDS: TlsFields = TlsFields {
    cert: "tls.cert",
    key: "tls.key",
};

/// The rustls server config for the PEM files `cert` (the chain, leaf
/// first) and `key` (PKCS#8, PKCS#1 or SEC1); errors name `tls.cert` or
/// `tls.key` and the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    sparegrid_transfer::tls::server_config(cert, key, FIELDS)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use tokio::net::TcpListener;

    use super::*;

    use crate::api::{serve_tls_on as serve_api, AppState};
    use crate::config::{AuthConfig, ControllerConfig};
    use crate::store::{SqliteStore, Store};

    /// A self-signed certificate for `localhost` and 127.0.0.1 written to
    /// `dir` as `cert.pem` and `key.pem`.
    pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn reads_a_cert_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let config = server_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");
    }

    #[test]
    fn errors_name_the_field_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &key).unwrap_err();
        assert_eq!(e.field(), "tls.cert");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = server_config(&cert, &missing).unwrap_err();
        assert_eq!(e.field(), "tls.key");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // The key file given as the cert and the other way round.
        let e = server_config(&key, &key).unwrap_err();
        assert_eq!(e.field(), "tls.cert", "{e}");
        assert!(e.to_string().contains("key.pem"), "{e}");
        let e = server_config(&cert, &cert).unwrap_err();
        assert_eq!(e.field(), "tls.key", "{e}");
        assert!(e.to_string().contains("PRIVATE KEY"), "{e}");
        // A key of another certificate.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = self_signed(other.path());
        let e = server_config(&cert, &other_key).unwrap_err();
        assert_eq!(e.field(), "tls.key", "{e}");
        assert!(e.to_string().contains("does not fit"), "{e}");
        // Garbage.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let e = server_config(&junk, &key).unwrap_err();
        assert_eq!(e.field(), "tls.cert", "{e}");
    }

    /// The API over HTTPS: a client trusting the self-signed certificate
    /// submits a job with its token; one that does not trust it, or speaks
    /// plain HTTP, gets nothing; the server stops on shutdown.
    #[tokio::test]
    async fn https_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let tls = server_config(&cert, &key).unwrap();
        let config = ControllerConfig {
            auth: AuthConfig {
                agent_token: None,
                submit_tokens: vec!["submit-token-tls".into()],
                admin_tokens: vec![],
            },
            ..ControllerConfig::default()
        };
        config.validate().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let state = AppState::new(store, &config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_api(listener, tls, state, async {
            let _ = stopped.await;
        }));

        let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let job = serde_json::json!({
            "command": {"argv": ["echo", "{start}"]},
            "split": {"range": {"start": 0, "end": 3, "chunk": 1}}
        });
        let r = client
            .post(format!("https://127.0.0.1:{}/v1/jobs", addr.port()))
            .bearer_auth("submit-token-tls")
            .json(&job)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["subtasks"], 3, "{v}");
        // By name too, and auth still applies over TLS.
        let r = client
            .get(format!("https://localhost:{}/v1/jobs", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);

        // A client that does not trust the certificate fails the handshake.
        let e = reqwest::Client::new()
            .get(format!("https://127.0.0.1:{}/openapi.json", addr.port()))
            .send()
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/openapi.json", addr.port()))
            .send()
            .await;
        if let Ok(r) = &plain {
            assert!(!r.status().is_success(), "{r:?}");
        }

        stop.send(()).unwrap();
        tokio::time::timeout(SHUTDOWN_GRACE * 2, server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}
