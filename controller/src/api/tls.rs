//! HTTPS for the API: [`server_config`] reads `[tls]`'s PEM certificate
//! chain and private key into a rustls server config (the `ring` crypto
//! provider, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`); [`serve_tls_on`]
//! serves the router with it through `axum-server`. Every error names the
//! config field (`tls.cert`, `tls.key`) and the file.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// How long open connections (event streams included) get to finish once
/// shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the TLS config could not be built; each names the field and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config field `{field}`: reading {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config field `{field}`: {} is not usable PEM: {message}", path.display())]
    Pem {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("config field `tls.key`: {} does not fit the certificate in {}: {message}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

impl TlsError {
    /// The config field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::Read { field, .. } | TlsError::Pem { field, .. } => field,
            TlsError::Mismatch { .. } => "tls.key",
        }
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

/// The rustls server config for the PEM files `cert` (the chain, leaf
/// first) and `key` (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |field: &'static str, path: &Path, message: String| TlsError::Pem {
        field,
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&read("tls.cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("tls.cert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(
            "tls.cert",
            cert,
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&read("tls.key", key)?).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY block found (PKCS#8, RSA or EC)".to_owned()
            }
            other => other.to_string(),
        };
        pem_err("tls.key", key, message)
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS with `config` on `listener` until `shutdown`
/// resolves; connections then get [`SHUTDOWN_GRACE`] to finish.
pub async fn serve_tls_on(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    axum_server::from_tcp_rustls(listener.into_std()?, RustlsConfig::from_config(config))?
        .handle(handle)
        .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await
}

#[cfg(test)]
pub(crate) mod tests {
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
