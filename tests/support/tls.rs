//! TLS for the tests: certificates made on the spot with rcgen (a root CA, intermediates, server
//! and client certificates), a blocking rustls client that reports the certificate it was shown,
//! and what a TLS backend (`Backend::start_tls`) presents and asks for.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lfguard::state::certs::Leaf;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{IO_TIMEOUT, Response, read_response};

/// The names every server certificate here is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sets a certificate's validity, in Unix seconds.
fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(not_before as u64);
    params.not_after = epoch + Duration::from_secs(not_after as u64);
}

/// A certificate authority that issues certificates for the tests.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// For an intermediate: its own certificate, then those of the intermediates above it. Empty
    /// for a root, which a full chain leaves out.
    intermediates: String,
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, then the chain of intermediates (a full chain).
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_after: i64,
}

impl Ca {
    /// A self-signed root CA.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let issuer = CertifiedIssuer::self_signed(ca_params(name), key).unwrap();
        Ca {
            issuer,
            intermediates: String::new(),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let issuer = CertifiedIssuer::signed_by(ca_params(name), key, &self.issuer).unwrap();
        let intermediates = format!("{}{}", issuer.pem(), self.intermediates);
        Ca {
            issuer,
            intermediates,
        }
    }

    /// The root's own certificate, what a client trusts.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `SERVER_NAMES`, valid from an hour ago for 30 days.
    pub fn server(&self) -> Issued {
        let now = unix_now();
        self.server_valid(now - 3600, now + 30 * 86_400)
    }

    /// A server certificate for `SERVER_NAMES`, valid from `not_before` to `not_after`.
    pub fn server_valid(&self, not_before: i64, not_after: i64) -> Issued {
        let names: Vec<String> = SERVER_NAMES.iter().map(|n| n.to_string()).collect();
        self.issue(
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            not_before,
            not_after,
        )
    }

    /// A client certificate named `name`, valid for 30 days.
    pub fn client(&self, name: &str) -> Issued {
        self.client_until(name, unix_now() + 30 * 86_400)
    }

    /// A client certificate named `name`, valid until `not_after`.
    pub fn client_until(&self, name: &str, not_after: i64) -> Issued {
        self.issue(
            vec![name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            unix_now() - 3600,
            not_after,
        )
    }

    fn issue(
        &self,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        not_before: i64,
        not_after: i64,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![usage];
        set_validity(&mut params, not_before, not_after);
        let mut serial = [0u8; 8];
        getrandom::fill(&mut serial).unwrap();
        serial[0] &= 0x7f;
        serial[0] |= 0x10;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf::of(cert.der()).unwrap();
        Issued {
            cert_pem: format!("{}{}", cert.pem(), self.intermediates),
            key_pem: key.serialize_pem(),
            serial: leaf.serial,
            not_after: leaf.not_after,
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = unix_now();
    set_validity(&mut params, now - 86_400, now + 365 * 86_400);
    params
}

impl Issued {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// Writes `pem` to `dir/name`.
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

// ---------------------------------------------------------------- client

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `ca_pem`, presenting `client` when given, offering `http/1.1`.
pub fn client_config(ca_pem: &str, client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(identity) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to lfguard (or any server), its handshake complete.
pub struct TlsConnection {
    reader: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsConnection {
    /// Connects to `addr` as `localhost` and completes the handshake; `Err` with rustls' reason
    /// when it fails.
    pub fn open(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<TlsConnection, String> {
        let socket = TcpStream::connect(addr).map_err(|err| err.to_string())?;
        socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let connection = ClientConnection::new(config, name).map_err(|err| err.to_string())?;
        let mut stream = StreamOwned::new(connection, socket);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|err| err.to_string())?;
        }
        // TLS 1.3: a server that refuses the client's certificate says so after the client's
        // side of the handshake is done; reading shows it.
        Ok(TlsConnection {
            reader: BufReader::new(stream),
        })
    }

    /// The serial number of the certificate the server presented.
    pub fn serial(&self) -> String {
        let certs = self.reader.get_ref().conn.peer_certificates().unwrap();
        Leaf::of(&certs[0]).unwrap().serial
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.reader
            .get_ref()
            .conn
            .alpn_protocol()
            .map(<[u8]>::to_vec)
    }

    /// Sends `bytes` and reads one response; `None` when the connection ended first.
    pub fn exchange(&mut self, bytes: &[u8]) -> Option<Response> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes).ok()?;
        stream.flush().ok()?;
        read_response(&mut self.reader)
    }
}

/// A request of `callback` that keeps the connection open (no `Connection: close`).
pub fn kept_alive(callback: &super::Callback) -> Vec<u8> {
    let bytes = callback.to_bytes();
    let text = String::from_utf8(bytes).unwrap();
    text.replacen("Connection: close\r\n", "", 1).into_bytes()
}

// ---------------------------------------------------------------- backend

/// What a TLS backend presents, whose client certificates it requires, and its keep-alive
/// timeout.
#[derive(Clone)]
pub struct BackendTls {
    config: Arc<rustls::ServerConfig>,
    pub idle_timeout: Option<Duration>,
}

impl BackendTls {
    pub fn new(identity: &Issued, client_ca: Option<&Ca>) -> BackendTls {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        BackendTls {
            config: Arc::new(config),
            idle_timeout: None,
        }
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}
