//! TLS to an https backend: the CAs its certificate is verified against (`upstream.ca_file`, or
//! the platform's roots, or the bundled webpki roots where the platform has none), the name it
//! must carry (`upstream.server_name`, or the URL's host; also the SNI sent), and the client
//! certificate lfguard presents when set. There is no way to skip verification.
//!
//! The files are re-read on reload like the listener's: new connections use the new ones,
//! pooled connections keep theirs until they close.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::state::certs::{self, Contents, FileWatch, Leaf, PairFile, Reloaded};

/// The metrics' label for TLS to the backend.
pub const ROLE: &str = "upstream";
/// The metrics' label for the expiry of lfguard's own client certificate.
pub const CLIENT_ROLE: &str = "upstream_client";

/// What `[upstream]` says of TLS, as plain values.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// The files, named by their keys, in the order `build` reads them.
    fn named(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = Vec::new();
        if let Some(ca) = &self.ca_file {
            files.push(("upstream.ca_file", ca.clone()));
        }
        if let (Some(cert), Some(key)) = (&self.client_cert_file, &self.client_key_file) {
            files.push(("upstream.client_cert_file", cert.clone()));
            files.push(("upstream.client_key_file", key.clone()));
        }
        files
    }
}

/// The trust anchors without `upstream.ca_file`: the platform's, or webpki's bundled ones; and
/// which of the two.
pub fn default_roots() -> (Arc<RootCertStore>, &'static str) {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added > 0 {
        return (Arc::new(roots), "the platform's");
    }
    let bundled = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    (Arc::new(bundled), "the bundled webpki roots")
}

/// What `build` makes of the files.
struct Built {
    config: ClientConfig,
    /// The earliest expiry among the CAs of `upstream.ca_file`.
    ca: Option<Leaf>,
    /// lfguard's client certificate.
    client: Option<Leaf>,
}

/// rustls' client configuration of the files' `contents` (in the order of `TlsFiles::named`);
/// every problem, each naming its key.
fn build(
    files: &TlsFiles,
    contents: &Contents,
    default_roots: Option<&Arc<RootCertStore>>,
    now: i64,
) -> Result<Built, Vec<String>> {
    let mut problems = Vec::new();
    let mut contents = contents.iter();
    let ca = match files.ca_file {
        Some(_) => {
            let pem = contents.next().map_or(&[][..], Vec::as_slice);
            match certs::parse_roots(pem) {
                Ok((roots, earliest)) => Some((Arc::new(roots), earliest)),
                Err(err) => {
                    problems.push(format!("upstream.ca_file: {err}"));
                    None
                }
            }
        }
        None => None,
    };
    let client = match (contents.next(), contents.next()) {
        (Some(cert), Some(key)) => match certs::certified_key(cert, key, now) {
            Ok(pair) => Some(pair),
            Err((file, err)) => {
                let key = match file {
                    PairFile::Cert => "upstream.client_cert_file",
                    PairFile::Key => "upstream.client_key_file",
                };
                problems.push(format!("{key}: {err}"));
                None
            }
        },
        _ => None,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let roots = match (&ca, default_roots) {
        (Some((roots, _)), _) => roots.clone(),
        (None, Some(roots)) => roots.clone(),
        (None, None) => Arc::new(RootCertStore::empty()),
    };
    let builder = ClientConfig::builder_with_provider(certs::provider())
        .with_protocol_versions(certs::PROTOCOL_VERSIONS)
        .map_err(|err| vec![format!("upstream.url: {err}")])?
        .with_root_certificates(roots);
    let (mut config, client) = match client {
        Some((certified, leaf)) => (
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified,
            ))),
            Some(leaf),
        ),
        None => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = vec![certs::ALPN_HTTP11.to_vec()];
    Ok(Built {
        config,
        ca: ca.map(|(_, earliest)| earliest),
        client,
    })
}

/// For `check-config`: the problems of the upstream's certificate files, or a line on each
/// saying when it expires.
pub fn check(files: &TlsFiles) -> Result<Vec<String>, Vec<String>> {
    let now = certs::unix_now();
    let built = certs::check_all(&files.named(), |contents| build(files, contents, None, now))?;
    let mut notes = Vec::new();
    if let (Some(path), Some(earliest)) = (&files.ca_file, built.ca) {
        notes.push(format!(
            "upstream.ca_file: {}: the first CA to expire {}",
            path.display(),
            earliest.expiry(now)
        ));
    }
    if let (Some(path), Some(leaf)) = (&files.client_cert_file, built.client) {
        notes.push(format!(
            "upstream.client_cert_file: {}: serial {}, {}",
            path.display(),
            leaf.serial,
            leaf.expiry(now)
        ));
    }
    Ok(notes)
}

/// The checks of an https upstream that need no file, each naming its key.
pub fn server_name_problem(name: &str) -> Option<String> {
    ServerName::try_from(name.to_string())
        .err()
        .map(|err| format!("upstream.server_name: {name:?} is no DNS name or IP address ({err})"))
}

/// TLS to the backend: the configuration new connections use, the name they verify.
pub struct UpstreamTls {
    name: ServerName<'static>,
    files: TlsFiles,
    default_roots: Option<Arc<RootCertStore>>,
    current: ArcSwap<ClientConfig>,
    watch: FileWatch,
    /// lfguard's client certificate's `notAfter`, for the metric.
    client_not_after: Option<i64>,
}

/// Why a handshake with the backend failed: the metric's reason and rustls' message.
#[derive(Debug)]
pub struct HandshakeFailure {
    pub reason: &'static str,
    pub message: String,
}

impl UpstreamTls {
    /// Reads the files; `name` is what the backend's certificate must carry.
    pub fn load(name: &str, files: TlsFiles) -> Result<Self, Vec<String>> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|err| vec![format!("upstream.server_name: {name:?}: {err}")])?;
        let default_roots = match files.ca_file {
            Some(_) => None,
            None => {
                let (roots, source) = default_roots();
                tracing::info!(
                    roots = source,
                    certificates = roots.len(),
                    "upstream certificates are verified against these roots"
                );
                Some(roots)
            }
        };
        let (watch, built) = FileWatch::start(files.named(), |contents| {
            build(&files, contents, default_roots.as_ref(), certs::unix_now())
        })?;
        Ok(UpstreamTls {
            name,
            current: ArcSwap::from_pointee(built.config),
            client_not_after: built.client.map(|leaf| leaf.not_after),
            files,
            default_roots,
            watch,
        })
    }

    /// `notAfter` of lfguard's client certificate, when it has one.
    pub fn client_not_after(&self) -> Option<i64> {
        self.client_not_after
    }

    /// Re-reads the files; `Ok(Some(client notAfter))` when new ones are in use, `Err` with the
    /// problems when they changed and do not load (the ones in use stay).
    pub fn reload(&self, explicit: bool) -> Result<Option<Option<i64>>, Vec<String>> {
        match self.watch.reload(explicit, |contents| {
            build(
                &self.files,
                contents,
                self.default_roots.as_ref(),
                certs::unix_now(),
            )
        }) {
            Reloaded::Unchanged | Reloaded::Pending => Ok(None),
            Reloaded::Applied(built) => {
                self.current.store(Arc::new(built.config));
                Ok(Some(built.client.map(|leaf| leaf.not_after)))
            }
            Reloaded::Failed(problems) => Err(problems),
        }
    }

    /// The handshake on a connected socket (`S` is the socket lfguard watches), and the
    /// `notAfter` of the certificate the backend presented.
    pub async fn connect<S>(
        &self,
        stream: S,
    ) -> Result<(TlsStream<S>, Option<i64>), HandshakeFailure>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let connector = TlsConnector::from(self.current.load_full());
        let stream = connector
            .connect(self.name.clone(), stream)
            .await
            .map_err(|err| HandshakeFailure {
                reason: certs::failure_reason(&err),
                message: err.to_string(),
            })?;
        let not_after = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| Leaf::of(leaf))
            .map(|leaf| leaf.not_after);
        Ok((stream, not_after))
    }
}
