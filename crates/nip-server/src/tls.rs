//! HTTPS for `nip serve` (`--tls-cert` / `--tls-key`): rustls with the ring provider, TLS 1.2 and
//! 1.3, HTTP/2 and HTTP/1.1 by ALPN. The certificate lives in a resolver that is swapped on SIGHUP
//! or when the files change, so new handshakes get the new certificate while connections already
//! open keep theirs. After the handshake a connection is served by [`crate::conn::serve_io`], with
//! the same limits as plain HTTP.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::conn::{self, ConnLimits};

/// The certificate and key files of `--tls-cert` / `--tls-key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How often the files' modification times are compared (reload on change).
const POLL_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it (--tls-cert)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it (--tls-key): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key} does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a PEM certificate chain and its private key, checking that they belong together.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}

/// Modification times and sizes of both files: what the poller compares.
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(files: &TlsFiles) -> Stamp {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let (c, k) = (one(&files.cert)?, one(&files.key)?);
    Some((c.0, c.1, k.0, k.1))
}

/// The current certificate, handed to every new handshake.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamp at the last load attempt, good or bad: a half-written pair that failed is
    /// tried again when the files change again, not every poll.
    seen: Mutex<Stamp>,
}

impl ReloadingCert {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = stamp(&files);
        let key = load(&files)?;
        Ok(ReloadingCert {
            files,
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
        })
    }

    /// Loads the files again; on failure the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.files);
        let key = load(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = stamp(&self.files);
        now.is_some() && *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(
                cert = %self.files.cert.display(),
                why,
                "TLS certificate reloaded; new connections use it"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                why,
                "TLS certificate not reloaded; still serving the previous one"
            ),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The rustls configuration: TLS 1.2+, ALPN h2 then http/1.1, the reloading certificate.
pub fn server_config(cert: Arc<ReloadingCert>) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// Reloads on SIGHUP and when the files change, until the handle is aborted.
pub fn spawn_reloader(cert: Arc<ReloadingCert>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "no SIGHUP handler; certificates reload on file change only"))
            .ok();
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup_recv => cert.reload_logged("SIGHUP"),
                _ = tick.tick() => {
                    if cert.changed() {
                        cert.reload_logged("file changed");
                    }
                }
            }
        }
    })
}

/// Serves `app` over HTTPS on `listener` until `shutdown`, with the same connection limits as
/// plain HTTP ([`crate::conn`]), reloading the certificate as it changes. The certificate is
/// loaded before anything is served: a bad one is an error at start. Each handshake runs in the
/// connection's own task, bounded by the read timeout, so a silent client holds up nobody.
pub async fn serve_https(
    listener: TcpListener,
    app: axum::Router,
    files: TlsFiles,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cert = Arc::new(ReloadingCert::new(files).map_err(std::io::Error::other)?);
    let acceptor = TlsAcceptor::from(Arc::new(server_config(cert.clone())));
    let reloader = spawn_reloader(cert);
    let result = conn::accept_loop(
        listener,
        limits,
        shutdown,
        move |stream, addr, watcher, stop| {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            async move {
                let handshake = tokio::select! {
                    r = tokio::time::timeout(limits.read_timeout, acceptor.accept(stream)) => r,
                    // Shutting down: a connection still in its handshake has no request to finish.
                    _ = stop.cancelled() => return,
                };
                match handshake {
                    // Requests in flight finish on shutdown: the watcher drains them gracefully.
                    Ok(Ok(tls)) => conn::serve_io(tls, addr, app, limits, watcher).await,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %addr, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
                }
            }
        },
    )
    .await;
    reloader.abort();
    result
}

/// Logs once that traffic is unencrypted when plain HTTP listens beyond the loopback interface.
pub fn warn_if_plaintext(local: std::io::Result<std::net::SocketAddr>) {
    if let Ok(addr) = local {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "serving plain HTTP on a non-loopback address: API keys and artifacts travel \
                 unencrypted; use --tls-cert/--tls-key or a TLS-terminating proxy"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn loads_a_matching_pair_and_names_the_file_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        assert!(load(&a).is_ok());
        let crossed = TlsFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = load(&crossed).unwrap_err().to_string();
        assert!(e.contains("does not belong") && e.contains("b.key"), "{e}");
        let swapped = TlsFiles {
            cert: a.key.clone(),
            key: a.cert.clone(),
        };
        assert!(matches!(
            load(&swapped),
            Err(TlsError::NoCertificate { .. })
        ));
        let missing = TlsFiles {
            cert: dir.path().join("nope.crt"),
            key: a.key.clone(),
        };
        assert!(load(&missing).unwrap_err().to_string().contains("nope.crt"));
    }

    #[test]
    fn failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let r = ReloadingCert::new(a.clone()).unwrap();
        let before = r.current.read().unwrap().cert[0].clone();
        std::fs::write(&a.cert, "garbage").unwrap();
        assert!(r.reload().is_err());
        assert_eq!(r.current.read().unwrap().cert[0], before);
        assert!(
            !r.changed(),
            "a failed attempt is not retried until the files change"
        );
    }
}
