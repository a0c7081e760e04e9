//! Optional TLS for the transfer endpoint: [`server_config`] reads
//! `transfer.tls_cert` (PEM chain) and `transfer.tls_key` (PKCS#8, PKCS#1
//! or SEC1) into a rustls config on the `ring` provider (the one reqwest's
//! rustls uses); [`serve_tls_on`] serves a router with it through
//! `axum-server`, as the controller's API does. Errors name the field.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// Time open transfers get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the TLS config could not be built; names the field and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config field `{field}`: reading {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config field `{field}`: {} is not usable: {message}", path.display())]
    Pem {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

/// The rustls server config for `cert` and `key`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem = |field: &'static str, path: &Path, message: String| TlsError::Pem {
        field,
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&read("transfer.tls_cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("transfer.tls_cert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(
            "transfer.tls_cert",
            cert,
            "no CERTIFICATE block".into(),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&read("transfer.tls_key", key)?)
        .map_err(|e| pem("transfer.tls_key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pem("transfer.tls_key", key, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| pem("transfer.tls_key", key, e.to_string()))?;
    Ok(Arc::new(config))
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
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
        .serve(app.into_make_service())
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
        server_config(&cert, &key).unwrap();
        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &key).unwrap_err();
        assert!(e.to_string().contains("transfer.tls_cert"), "{e}");
        let e = server_config(&cert, &cert).unwrap_err();
        assert!(e.to_string().contains("transfer.tls_key"), "{e}");
    }
}
