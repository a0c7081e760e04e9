//! TLS for the transfer endpoint and the controller's API (one copy for
//! both binaries; the controller links this crate to host transfers too):
//! [`server_config`] reads a PEM certificate chain and private key
//! (PKCS#8, PKCS#1 or SEC1) into a rustls config on the `ring` provider
//! (the one reqwest's rustls uses), TLS 1.2 and 1.3, ALPN `h2` and
//! `http/1.1`; [`serve_tls_on`] serves a router with it through
//! `axum-server`, with the peer address as connect info. Every error names
//! the config field ([`TlsFields`]: `transfer.tls_cert`, `tls.cert`, …) and
//! the file.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// Time open connections (transfers, event streams) get to finish once
/// shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The config fields that name the certificate and the key, for errors.
#[derive(Debug, Clone, Copy)]
pub struct TlsFields {
    pub cert: &'static str,
    pub key: &'static str,
}

/// The transfer endpoint's fields.
pub const TRANSFER_FIELDS: TlsFields = TlsFields {
    cert: "transfer.tls_cert",
    key: "transfer.tls_key",
};

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
    #[error("config field `{field}`: {} does not fit the certificate in {}: {message}", key.display(), cert.display())]
    Mismatch {
        field: &'static str,
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

impl TlsError {
    /// The config field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::Read { field, .. }
            | TlsError::Pem { field, .. }
            | TlsError::Mismatch { field, .. } => field,
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
/// first) and `key`; errors name `fields`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    fields: TlsFields,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem = |field: &'static str, path: &Path, message: String| TlsError::Pem {
        field,
        path: path.to_owned(),
        message,
    };
    let mismatch = |e: rustls::Error| TlsError::Mismatch {
        field: fields.key,
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&read(fields.cert, cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(fields.cert, cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(
            fields.cert,
            cert,
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&read(fields.key, key)?).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY block found (PKCS#8, RSA or EC)".to_owned()
            }
            other => other.to_string(),
        };
        pem(fields.key, key, message)
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(mismatch)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS with `config` on `listener` until `shutdown`
/// resolves; connections then get [`SHUTDOWN_GRACE`] to finish. Handlers
/// can read the peer address (`ConnectInfo<SocketAddr>`).
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
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        server_config(&cert, &key, TRANSFER_FIELDS).unwrap();
        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &key, TRANSFER_FIELDS).unwrap_err();
        assert!(e.to_string().contains("transfer.tls_cert"), "{e}");
        let e = server_config(&cert, &cert, TRANSFER_FIELDS).unwrap_err();
        assert!(e.to_string().contains("transfer.tls_key"), "{e}");
    }
}
