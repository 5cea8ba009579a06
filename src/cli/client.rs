//! The HTTP(S) client of `send` and `demo`: one kept-alive HTTP/1.1 connection to the URL's host,
//! opened again when it closes, over TLS for `https://` (verified against `--ca-file` or the
//! platform's roots; not at all with `send --insecure`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::proxy::upstream::tls::default_roots;
use crate::state::certs;

/// How an error begins when the TLS handshake failed.
pub const TLS_FAILED: &str = "TLS handshake failed";

/// How an https server's certificate is checked.
#[derive(Debug, Clone, Copy)]
pub enum Verify<'a> {
    /// Against the CAs of this file, or the platform's roots when `None`.
    Roots(Option<&'a Path>),
    /// Not at all (`send --insecure`).
    Insecure,
}

/// Where requests go: the URL's host and port, and TLS for https.
pub struct Target {
    authority: Authority,
    /// What to connect to, when it is not the URL's host (the demo's own lfguard).
    connect_to: Option<SocketAddr>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    /// The target of `uri` (`http://` or `https://`); `connect_to` overrides where to connect.
    pub fn new(
        uri: &Uri,
        verify: Verify<'_>,
        connect_to: Option<SocketAddr>,
    ) -> Result<Arc<Target>, String> {
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{uri}: no host"))?;
        let tls = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => None,
            Some(scheme) if *scheme == Scheme::HTTPS => {
                let host = unbracketed(authority.host());
                let name = ServerName::try_from(host.to_string())
                    .map_err(|err| format!("{uri}: {err}"))?;
                Some((TlsConnector::from(Arc::new(client_config(verify)?)), name))
            }
            _ => return Err(format!("{uri}: not an http:// or https:// URL")),
        };
        Ok(Arc::new(Target {
            authority,
            connect_to,
            tls,
        }))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        let port = self.authority.port_u16().unwrap_or(default_port);
        let stream = match self.connect_to {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((unbracketed(self.authority.host()), port)).await,
        }
        .map_err(|err| format!("cannot connect to {}: {err}", self.authority))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => handshake(stream).await,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|err| format!("{TLS_FAILED}: {err}"))?;
                handshake(stream).await
            }
        }
    }
}

fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host)
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| with_causes(&err))?;
    tokio::spawn(connection);
    Ok(sender)
}

fn client_config(verify: Verify<'_>) -> Result<ClientConfig, String> {
    let provider = certs::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(certs::PROTOCOL_VERSIONS)
        .map_err(|err| err.to_string())?;
    let mut config = match verify {
        Verify::Roots(Some(path)) => {
            let pem = certs::read(path)?;
            let (roots, _) =
                certs::parse_roots(&pem).map_err(|err| format!("{}: {err}", path.display()))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::Roots(None) => builder
            .with_root_certificates(default_roots().0)
            .with_no_client_auth(),
        Verify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![certs::ALPN_HTTP11.to_vec()];
    Ok(config)
}

/// `send --insecure`: any certificate is accepted; the handshake's signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One connection at a time to the target, opened when needed.
pub struct Client {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(target: Arc<Target>) -> Client {
        Client {
            target,
            sender: None,
        }
    }

    /// Sends `request` (its URI absolute or origin-form) on the open connection, or a new one
    /// when it closed.
    pub async fn request(
        &mut self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, String> {
        if let Some(path_and_query) = request.uri().path_and_query().cloned() {
            *request.uri_mut() = Uri::from(path_and_query);
        }
        if !request.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(self.target.authority.as_str())
                .map_err(|err| err.to_string())?;
            request.headers_mut().insert(header::HOST, host);
        }
        let mut sender = match self.sender.take() {
            Some(mut open) => match open.ready().await {
                Ok(()) => open,
                Err(_closed) => self.target.connect().await?,
            },
            None => self.target.connect().await?,
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| with_causes(&err))?;
        self.sender = Some(sender);
        Ok(response)
    }
}

/// An error and its causes, `outer: inner: …`: hyper's own message ("connection closed before
/// message completed") does not say what went wrong.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
