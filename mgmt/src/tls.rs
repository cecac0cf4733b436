//! HTTPS on the REST listener (`--mgmt-tls-cert`/`--mgmt-tls-key`): the certificate
//! chain and private key, loaded once at start-up into a rustls configuration (TLS 1.2
//! and 1.3, the `ring` provider, HTTP/1.1 by ALPN), and a [`TlsListener`] that hands
//! axum only the connections whose handshake completed.
//!
//! What it must never do: let a slow or silent client hold up the accept loop, or any
//! other client. Each handshake runs in a task of its own with a deadline
//! ([`HANDSHAKE_TIMEOUT`]); at most [`HANDSHAKES_MAX`] run at once, after which the
//! kernel's backlog holds new connections until one ends. A handshake that fails —
//! plain HTTP sent to the port, a client that does not trust the certificate, a
//! timeout — is logged at debug and counted (`dosd_mgmt_tls_handshake_failures_total`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::metrics::MgmtCounters;

/// How long a client has, from its TCP connection, to complete the TLS handshake: ample
/// for any real client on any link, short enough that a silent one is soon let go.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once. Each holds a socket and a rustls connection (some
/// tens of KiB of buffers) for at most [`HANDSHAKE_TIMEOUT`]; an operator's tools open
/// a handful at a time.
pub const HANDSHAKES_MAX: usize = 64;
/// A PEM certificate chain or key is a few KiB; a file far larger is a wrong path.
const PEM_FILE_BYTES_MAX: u64 = 1 << 20;

/// Where the certificate chain and the key are (both PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain: the node's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// The private key of the first certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// Why the certificate or key cannot be used. Each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is larger than {PEM_FILE_BYTES_MAX} bytes: not a PEM {what}")]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("certificate file {path}: {why}")]
    Cert { path: PathBuf, why: String },
    #[error("key file {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("key file {key} does not hold the private key of the first certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// Reads a PEM file whole, refusing one too large to be a certificate or key. The mode
/// is the opened file's (not whatever the path names a moment later).
fn read_pem(what: &'static str, path: &Path) -> Result<(Vec<u8>, u32), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let io_error = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(io_error(std::io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::TooLarge {
            what,
            path: path.to_owned(),
        });
    }
    Ok((bytes, metadata.permissions().mode()))
}

/// Whether a file mode lets group or others read the file.
fn readable_by_others(mode: u32) -> bool {
    mode & 0o044 != 0
}

fn pem_why(e: &pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "no PEM block of the expected kind".into(),
        other => format!("not valid PEM: {other}"),
    }
}

/// The certificate chain in `pem_text`, in file order.
fn parse_certs(path: &Path, pem_text: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert {
            path: path.to_owned(),
            why: pem_why(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: path.to_owned(),
            why: "no certificate in it (expected a PEM block BEGIN CERTIFICATE)".into(),
        });
    }
    Ok(certs)
}

/// The first private key in `pem_text`.
fn parse_key(path: &Path, pem_text: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |why: String| TlsError::Key {
        path: path.to_owned(),
        why,
    };
    PrivateKeyDer::from_pem_slice(pem_text).map_err(|e| match e {
        pem::Error::NoItemsFound if contains(pem_text, b"BEGIN ENCRYPTED PRIVATE KEY") => err(
            "the key is encrypted; dosd needs it unencrypted (openssl pkey -in KEY -out PLAIN)"
                .into(),
        ),
        pem::Error::NoItemsFound => err(
            "no private key in it (expected a PEM block BEGIN PRIVATE KEY, \
             BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)"
                .into(),
        ),
        other => err(pem_why(&other)),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The rustls configuration for `certs` and `key`: TLS 1.2 and 1.3 on `ring`, no
/// client certificates, HTTP/1.1 offered by ALPN (the only protocol served).
fn server_config(
    files: &TlsFiles,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Key {
            path: files.key.clone(),
            why: format!("the TLS provider refuses TLS 1.2/1.3: {e}"),
        })?;
    let mut config = builder
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::Mismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                }
            }
            rustls::Error::InvalidCertificate(e) => TlsError::Cert {
                path: files.cert.clone(),
                why: format!("the first certificate cannot be read: {e}"),
            },
            other => TlsError::Key {
                path: files.key.clone(),
                why: format!("cannot use the private key: {other}"),
            },
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Loads the certificate chain and key and checks that they belong together (as far as
/// rustls can tell: the key's public half against the first certificate's). Warns when
/// the key file is readable by group or others.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_pem, _) = read_pem("certificate", &files.cert)?;
    let certs = parse_certs(&files.cert, &cert_pem)?;
    let (key_pem, key_mode) = read_pem("key", &files.key)?;
    if readable_by_others(key_mode) {
        tracing::warn!(
            file = %files.key.display(),
            mode = %format!("{:o}", key_mode & 0o7777),
            "the management TLS key file is readable by group or others: chmod 600 it"
        );
    }
    let key = parse_key(&files.key, &key_pem)?;
    let config = server_config(files, certs, key)?;
    Ok(Arc::new(config))
}

/// The REST listener with TLS: TCP connections in, established TLS streams out. Each
/// handshake runs in a task of its own, so [`accept`](axum::serve::Listener::accept)
/// returns whichever finishes first; dropping the listener (the server stopping) ends
/// the handshakes still in progress.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
    counters: Arc<MgmtCounters>,
}

impl TlsListener {
    /// TLS with `config` on `tcp`; failed handshakes are counted in `counters`.
    pub fn new(
        tcp: tokio::net::TcpListener,
        config: Arc<ServerConfig>,
        counters: Arc<MgmtCounters>,
    ) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
            counters,
        }
    }

    fn start_handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let acceptor = self.acceptor.clone();
        let counters = Arc::clone(&self.counters);
        self.handshakes.spawn(async move {
            let failed = |why: &str| {
                counters
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = why, "management: TLS handshake failed");
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some((tls, peer)),
                Ok(Err(e)) => {
                    failed(&e.to_string());
                    None
                }
                Err(_) => {
                    failed(&format!(
                        "not completed within {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ));
                    None
                }
            }
        });
    }
}

/// Errors of `accept` that concern one connection only (it went away before it was
/// taken); any other (out of descriptors, of memory) is the listener's and is retried
/// after a pause, as axum does for plain TCP.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// How long accepting pauses after an error of the listener (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Both arms are cancel-safe: axum drops this future when told to stop, and the
        // handshakes live on in the set until the listener itself is dropped.
        loop {
            let room = self.handshakes.len() < HANDSHAKES_MAX;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((tcp, peer)) => self.start_handshake(tcp, peer),
                    Err(e) if connection_error(&e) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "management: cannot accept a connection");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => match done {
                    Ok(Some(established)) => return established,
                    // Counted and logged by the task.
                    Ok(None) => {}
                    Err(e) => {
                        self.counters
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "management: TLS handshake task ended");
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh self-signed certificate for localhost and its key (PKCS#8), in PEM.
    fn self_signed() -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (made.cert.pem(), made.key_pair.serialize_pem())
    }

    /// Writes `cert` and `key` into a fresh directory under `dir`.
    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let dir = tempfile::tempdir_in(dir).unwrap().keep();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let config = load(&files(dir.path(), &cert, &key)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // A chain: the node's certificate first, anything after it is sent along.
        let (other_cert, _) = self_signed();
        load(&files(dir.path(), &format!("{cert}{other_cert}"), &key)).unwrap();
    }

    /// SEC1 (`BEGIN EC PRIVATE KEY`) and PKCS#1 (`BEGIN RSA PRIVATE KEY`) keys, as
    /// openssl writes them; skipped where there is no openssl.
    #[test]
    fn sec1_and_pkcs1_keys_load() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .map(|o| o.status.success())
        };
        let Ok(true) = run(&["version"]) else {
            eprintln!("skipped: no openssl command");
            return;
        };
        for (key_cmd, begins) in [
            (
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    "key.pem",
                ][..],
                "-----BEGIN EC PRIVATE KEY-----",
            ),
            (
                &["genrsa", "-traditional", "-out", "key.pem", "2048"][..],
                "-----BEGIN RSA PRIVATE KEY-----",
            ),
        ] {
            assert_eq!(run(key_cmd).ok(), Some(true), "{key_cmd:?}");
            let cert_cmd = [
                "req",
                "-x509",
                "-new",
                "-key",
                "key.pem",
                "-subj",
                "/CN=localhost",
                "-days",
                "2",
                "-out",
                "cert.pem",
            ];
            assert_eq!(run(&cert_cmd).ok(), Some(true));
            let key = std::fs::read_to_string(d.join("key.pem")).unwrap();
            assert!(key.starts_with(begins), "{key}");
            load(&TlsFiles {
                cert: d.join("cert.pem"),
                key: d.join("key.pem"),
            })
            .unwrap_or_else(|e| panic!("{begins}: {e}"));
        }
    }

    #[test]
    fn every_problem_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let cases = [
            (
                TlsFiles {
                    cert: d.join("missing.pem"),
                    key: d.join("key.pem"),
                },
                "missing.pem",
                "cannot read certificate file",
            ),
            (files(d, "", &key), "cert.pem", "no certificate"),
            (files(d, &key, &key), "cert.pem", "no certificate"),
            (files(d, &cert, &cert), "key.pem", "no private key"),
            (files(d, &cert, ""), "key.pem", "no private key"),
            (files(d, &cert, encrypted), "key.pem", "encrypted"),
            (
                files(d, "-----BEGIN CERTIFICATE-----\nnot base64!\n", &key),
                "cert.pem",
                "not valid PEM",
            ),
            (
                files(
                    d,
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    &key,
                ),
                "cert.pem",
                "cannot be read",
            ),
            (files(d, &cert, &other_key), "key.pem", "does not hold"),
            (
                TlsFiles {
                    cert: d.to_path_buf(),
                    key: d.join("key.pem"),
                },
                "certificate file",
                "not a regular file",
            ),
        ];
        for (files, names, says) in cases {
            let e = load(&files).unwrap_err().to_string();
            assert!(e.contains(names), "{e}");
            assert!(e.contains(says), "{e}");
        }
        std::fs::write(d.join("big.pem"), vec![b'A'; 2 << 20]).unwrap();
        let e = load(&TlsFiles {
            cert: d.join("big.pem"),
            key: d.join("key.pem"),
        })
        .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn key_modes() {
        assert!(readable_by_others(0o100644));
        assert!(readable_by_others(0o640));
        assert!(!readable_by_others(0o100600));
        assert!(!readable_by_others(0o400));
    }
}
