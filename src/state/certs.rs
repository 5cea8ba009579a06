//! Certificate files, as the TLS listener and the https upstream read them: PEM certificate
//! chains, private keys and CA bundles, parsed from the bytes read (so that a reload can compare
//! what it reads with what it read last), a chain checked against its key, and when a certificate
//! is valid. Also the names under which failed handshakes are counted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, RootCertStore, SupportedProtocolVersion};

/// TLS 1.3 and 1.2; nothing older.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The ALPN protocol lfguard speaks, on both sides.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// rustls with *ring*, the one provider lfguard builds with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Seconds since the Unix epoch, as certificates and the expiry metric count time.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

/// A timestamp as check-config and the logs print it: `2026-05-01 12:00:00 UTC`.
pub fn date(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map_or_else(
        || format!("{unix} (seconds since 1970)"),
        |at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// What lfguard reads of a certificate: its serial number and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl Leaf {
    /// Reads the serial number and validity of a DER certificate; `None` when it is not one.
    pub fn of(der: &[u8]) -> Option<Leaf> {
        // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
        //   serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
        //   validity SEQUENCE { notBefore Time, notAfter Time }, … }, … }
        let (certificate, _) = Der::new(der).read(SEQUENCE)?;
        let (tbs, _) = Der::new(certificate).read(SEQUENCE)?;
        let mut tbs = Der::new(tbs);
        if tbs.peek() == Some(VERSION) {
            tbs.read(VERSION)?;
        }
        let serial = tbs.read(INTEGER)?.0;
        tbs.read(SEQUENCE)?;
        tbs.read(SEQUENCE)?;
        let mut validity = Der::new(tbs.read(SEQUENCE)?.0);
        let not_before = validity.time()?;
        let not_after = validity.time()?;
        // A positive serial may carry a leading zero byte for its sign; openssl leaves it out.
        let serial = match serial {
            [0, rest @ ..] if !rest.is_empty() => rest,
            all => all,
        };
        Some(Leaf {
            serial: serial.iter().map(|byte| format!("{byte:02X}")).collect(),
            not_before,
            not_after,
        })
    }

    /// Whether `now` is past the certificate's end.
    pub fn expired(&self, now: i64) -> bool {
        now > self.not_after
    }

    /// `expires 2026-05-01 12:00:00 UTC, in 89 days` (or `expired …`).
    pub fn expiry(&self, now: i64) -> String {
        let days = (self.not_after - now).div_euclid(86_400);
        if self.expired(now) {
            format!("expired {}", date(self.not_after))
        } else {
            format!("expires {}, in {days} days", date(self.not_after))
        }
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Just enough DER to walk to a certificate's validity: definite lengths, one-byte tags.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der(bytes)
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The contents of the next element, which must have `tag`, and its tag.
    fn read(&mut self, tag: u8) -> Option<(&'a [u8], u8)> {
        let (found, contents) = self.next()?;
        (found == tag).then_some((contents, found))
    }

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let length = rest[..count]
                .iter()
                .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
            (length, &rest[count..])
        };
        if rest.len() < length {
            return None;
        }
        let (contents, rest) = rest.split_at(length);
        self.0 = rest;
        Some((tag, contents))
    }

    /// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as Unix seconds.
    fn time(&mut self) -> Option<i64> {
        let (tag, contents) = self.next()?;
        let text = std::str::from_utf8(contents).ok()?.strip_suffix('Z')?;
        let (year, rest) = match tag {
            UTC_TIME if text.len() == 12 => {
                let short: i32 = text.get(..2)?.parse().ok()?;
                // RFC 5280: 50 to 99 are 1950 to 1999.
                (if short >= 50 { 1900 } else { 2000 } + short, &text[2..])
            }
            GENERALIZED_TIME if text.len() == 14 => (text.get(..4)?.parse().ok()?, &text[4..]),
            _ => return None,
        };
        let field = |at: usize| -> Option<u32> { rest.get(at..at + 2)?.parse().ok() };
        let date = chrono::NaiveDate::from_ymd_opt(year, field(0)?, field(2)?)?;
        let at = date.and_hms_opt(field(4)?, field(6)?, field(8)?)?;
        Some(at.and_utc().timestamp())
    }
}

/// A file's bytes; the message names the file.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))
}

/// Every certificate of a PEM file, the end-entity certificate first.
pub fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("not a PEM certificate file: {err}"))?;
    if chain.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".to_string()
        }
        other => format!("not a PEM private key file: {other}"),
    })
}

/// The certificates of a PEM CA bundle as trust anchors, and the earliest of their expiries.
pub fn parse_roots(pem: &[u8]) -> Result<(RootCertStore, Leaf), String> {
    let mut roots = RootCertStore::empty();
    let mut earliest: Option<Leaf> = None;
    for certificate in parse_chain(pem)? {
        let leaf = Leaf::of(&certificate).ok_or("holds a certificate that cannot be read")?;
        roots
            .add(certificate)
            .map_err(|err| format!("holds a certificate that is no CA: {err}"))?;
        if earliest
            .as_ref()
            .is_none_or(|known| leaf.not_after < known.not_after)
        {
            earliest = Some(leaf);
        }
    }
    let earliest = earliest.ok_or("holds no PEM certificate")?;
    Ok((roots, earliest))
}

/// Which file of a certificate and its key a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFile {
    Cert,
    Key,
}

/// A certificate chain and its private key, checked to belong together and to be valid now.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    now: i64,
) -> Result<(Arc<CertifiedKey>, Leaf), (PairFile, String)> {
    let chain = parse_chain(cert_pem).map_err(|err| (PairFile::Cert, err))?;
    let leaf = Leaf::of(&chain[0]).ok_or((
        PairFile::Cert,
        "its first certificate cannot be read".to_string(),
    ))?;
    let key = parse_key(key_pem).map_err(|err| (PairFile::Key, err))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|err| match err {
        rustls::Error::InconsistentKeys(_) => (
            PairFile::Key,
            "is not the key of the certificate (its public key differs)".to_string(),
        ),
        other => (PairFile::Key, format!("cannot be used: {other}")),
    })?;
    if leaf.expired(now) {
        return Err((
            PairFile::Cert,
            format!("the certificate {}", leaf.expiry(now)),
        ));
    }
    Ok((Arc::new(certified), leaf))
}

/// The bytes of a set of files, in the order they were named.
pub type Contents = Vec<Vec<u8>>;

/// Reads every file, each named by its configuration key; every problem, each naming its key.
pub fn read_all(files: &[(&'static str, PathBuf)]) -> Result<Contents, Vec<String>> {
    let mut contents = Vec::with_capacity(files.len());
    let mut problems = Vec::new();
    for (key, path) in files {
        match read(path) {
            Ok(bytes) => contents.push(bytes),
            Err(err) => problems.push(format!("{key}: {err}")),
        }
    }
    if problems.is_empty() {
        Ok(contents)
    } else {
        Err(problems)
    }
}

/// For check-config: reads every file and builds of them, reporting every problem. A file that
/// cannot be read is reported as such, and the others are still checked.
pub fn check_all<T>(
    files: &[(&'static str, PathBuf)],
    build: impl FnOnce(&Contents) -> Result<T, Vec<String>>,
) -> Result<T, Vec<String>> {
    let mut contents = Vec::with_capacity(files.len());
    let mut problems = Vec::new();
    let mut unreadable = Vec::new();
    for (key, path) in files {
        match read(path) {
            Ok(bytes) => contents.push(bytes),
            Err(err) => {
                problems.push(format!("{key}: {err}"));
                unreadable.push(format!("{key}: "));
                contents.push(Vec::new());
            }
        }
    }
    match build(&contents) {
        Ok(built) if problems.is_empty() => Ok(built),
        Ok(_) => Err(problems),
        Err(more) => {
            // An unreadable file was read as empty; what that says about it is known already.
            problems.extend(
                more.into_iter()
                    .filter(|problem| !unreadable.iter().any(|key| problem.starts_with(key))),
            );
            Err(problems)
        }
    }
}

/// The certificate files of one TLS configuration, and what they held when last read: a reload
/// builds a new configuration only when they changed, compared by content (which notices a
/// Kubernetes Secret's symlink swap, which leaves modification times alone).
pub struct FileWatch {
    files: Vec<(&'static str, PathBuf)>,
    state: Mutex<WatchState>,
}

struct WatchState {
    /// The contents of the configuration in use.
    in_use: Contents,
    /// The last read, good or bad.
    last: Result<Contents, Vec<String>>,
    /// The failed read last reported, so that it is reported once.
    reported: Option<Result<Contents, Vec<String>>>,
}

/// What a reload came to.
#[derive(Debug)]
pub enum Reloaded<T> {
    /// The files hold what is in use.
    Unchanged,
    /// They changed, and this was built of them: it is to be used from now on.
    Applied(T),
    /// They changed and do not load: to be logged and counted; the one in use stays.
    Failed(Vec<String>),
    /// They do not load, and this was reported already or may be a replacement half-way.
    Pending,
}

impl FileWatch {
    /// Reads `files` and builds the first configuration of them.
    pub fn start<T>(
        files: Vec<(&'static str, PathBuf)>,
        build: impl FnOnce(&Contents) -> Result<T, Vec<String>>,
    ) -> Result<(Self, T), Vec<String>> {
        let contents = read_all(&files)?;
        let built = build(&contents)?;
        let state = WatchState {
            in_use: contents.clone(),
            last: Ok(contents),
            reported: None,
        };
        Ok((
            FileWatch {
                files,
                state: Mutex::new(state),
            },
            built,
        ))
    }

    /// Re-reads the files and, when they differ from those in use, builds anew of them. A
    /// failure is reported once. From the file watch (`explicit` false) only once the same
    /// contents were read twice in a row: certbot and cert-manager write a certificate and its
    /// key one after the other, and a read between the two is no failure. On SIGHUP (`explicit`)
    /// at once.
    pub fn reload<T>(
        &self,
        explicit: bool,
        build: impl FnOnce(&Contents) -> Result<T, Vec<String>>,
    ) -> Reloaded<T> {
        let read = read_all(&self.files);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = match &read {
            Ok(contents) if *contents == state.in_use => {
                state.reported = None;
                Reloaded::Unchanged
            }
            Ok(contents) => match build(contents) {
                Ok(built) => {
                    state.in_use = contents.clone();
                    state.reported = None;
                    Reloaded::Applied(built)
                }
                Err(problems) => Self::failed(&mut state, &read, explicit, problems),
            },
            Err(problems) => Self::failed(&mut state, &read, explicit, problems.clone()),
        };
        state.last = read;
        outcome
    }

    fn failed<T>(
        state: &mut WatchState,
        read: &Result<Contents, Vec<String>>,
        explicit: bool,
        problems: Vec<String>,
    ) -> Reloaded<T> {
        let settled = explicit || state.last == *read;
        if settled && state.reported.as_ref() != Some(read) {
            state.reported = Some(read.clone());
            Reloaded::Failed(problems)
        } else {
            Reloaded::Pending
        }
    }
}

/// A failed handshake's reason, as the metric labels it. `err` is what tokio-rustls returned.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    if let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return tls_failure_reason(tls);
    }
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => "closed",
        _ => "io_error",
    }
}

fn tls_failure_reason(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name_mismatch"
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => "certificate_expired",
            // rustls may add kinds; whatever else is wrong with it is a bad certificate.
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::DecryptError => "protocol_error",
        // `rustls::Error` is non-exhaustive.
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 certificate (no version field) made with `openssl ca -selfsign -startdate
    /// 20240102030405Z -enddate 20510102030405Z` and serial 0xFF01: a UTCTime, then a
    /// GeneralizedTime (years from 2050 on), and a serial with a leading zero byte.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBCTCBsAIDAP8BMAoGCCqGSM49BAMCMA8xDTALBgNVBAMMBHRlc3QwIBcNMjQw
MTAyMDMwNDA1WhgPMjA1MTAxMDIwMzA0MDVaMA8xDTALBgNVBAMMBHRlc3QwWTAT
BgcqhkjOPQIBBggqhkjOPQMBBwNCAARTo4bkNsKSL7KzS/ibILuSFEUrRGet2LY6
EnR2eds97XuKqKIaqmunpPULoOQjN7VobvvA9uKSXCBUWEJEp4pRMAoGCCqGSM49
BAMCA0gAMEUCIQCZk1QeAqdzdpf/s/G0OWA3MkLMQpFnf2OPKhrXzbSbfAIgShWZ
VymROo7D3fXzIvTDVSNAZRMzQHkJbtF3+Iebkic=
-----END CERTIFICATE-----
";

    /// A version 3 certificate from rcgen, valid from `not_before` to `not_after` (Unix
    /// seconds), with its key.
    fn generated(not_before: i64, not_after: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["lfguard.test".into()]).unwrap();
        params.not_before =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_before as u64);
        params.not_after =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after as u64);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x7f, 0x00, 0x2a]));
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_validity_and_serial_of_a_certificate_are_read() {
        let der = parse_chain(CERT.as_bytes()).unwrap().remove(0);
        let leaf = Leaf::of(&der).unwrap();
        assert_eq!(leaf.serial, "FF01");
        assert_eq!(date(leaf.not_before), "2024-01-02 03:04:05 UTC");
        assert_eq!(date(leaf.not_after), "2051-01-02 03:04:05 UTC");
        assert!(!leaf.expired(leaf.not_after));
        assert!(leaf.expired(leaf.not_after + 1));
        assert!(
            leaf.expiry(leaf.not_after - 86_400 * 3)
                .ends_with(", in 3 days")
        );
        assert!(
            leaf.expiry(leaf.not_after + 1)
                .starts_with("expired 2051-01-02")
        );
    }

    #[test]
    fn what_is_not_a_certificate_is_not_read_as_one() {
        assert_eq!(Leaf::of(b""), None);
        assert_eq!(Leaf::of(&[0x30, 0x82, 0xff]), None);
        assert_eq!(Leaf::of(&[0x30, 0x03, 0x02, 0x01, 0x01]), None);
        assert!(
            parse_chain(b"")
                .unwrap_err()
                .contains("holds no PEM certificate")
        );
        assert!(
            parse_key(CERT.as_bytes())
                .unwrap_err()
                .contains("holds no PEM private key")
        );
    }

    #[test]
    fn a_generated_certificate_and_its_key_are_read_and_checked() {
        let now = unix_now();
        let (cert, key) = generated(now - 3600, now + 86_400 * 10);
        let (certified, leaf) = certified_key(cert.as_bytes(), key.as_bytes(), now).unwrap();
        assert_eq!(certified.cert.len(), 1);
        assert_eq!(leaf.serial, "7F002A");
        assert_eq!(
            (leaf.not_before, leaf.not_after),
            (now - 3600, now + 86_400 * 10)
        );
        assert!(
            leaf.expiry(now).ends_with(", in 10 days"),
            "{}",
            leaf.expiry(now)
        );

        let (_, other_key) = generated(now - 3600, now + 86_400);
        let (file, message) = certified_key(cert.as_bytes(), other_key.as_bytes(), now)
            .err()
            .unwrap();
        assert_eq!(file, PairFile::Key);
        assert!(
            message.contains("not the key of the certificate"),
            "{message}"
        );

        let (file, message) = certified_key(cert.as_bytes(), b"", now).err().unwrap();
        assert_eq!(
            (file, message.contains("no PEM private key")),
            (PairFile::Key, true)
        );
        let (file, _) = certified_key(key.as_bytes(), key.as_bytes(), now)
            .err()
            .unwrap();
        assert_eq!(file, PairFile::Cert);

        let (old, old_key) = generated(now - 86_400 * 2, now - 86_400);
        let (file, message) = certified_key(old.as_bytes(), old_key.as_bytes(), now)
            .err()
            .unwrap();
        assert_eq!(file, PairFile::Cert);
        assert!(message.starts_with("the certificate expired "), "{message}");
    }

    #[test]
    fn a_ca_bundle_reads_as_trust_anchors_with_its_earliest_expiry() {
        let now = unix_now();
        let (first, _) = generated(now - 10, now + 1000);
        let bundle = format!("{first}{CERT}");
        let (roots, earliest) = parse_roots(bundle.as_bytes()).unwrap();
        assert_eq!(roots.len(), 2);
        assert_eq!(earliest.not_after, now + 1000);
        assert!(parse_roots(b"nothing").is_err());
    }

    #[test]
    fn handshake_failures_are_named() {
        let wrapped = |err: rustls::Error| {
            failure_reason(&std::io::Error::new(std::io::ErrorKind::InvalidData, err))
        };
        assert_eq!(
            wrapped(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            "unknown_issuer"
        );
        assert_eq!(
            wrapped(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            )),
            "name_mismatch"
        );
        assert_eq!(
            wrapped(rustls::Error::NoCertificatesPresented),
            "no_certificate"
        );
        assert_eq!(
            failure_reason(&std::io::ErrorKind::UnexpectedEof.into()),
            "closed"
        );
    }

    #[test]
    fn a_file_watch_builds_on_change_and_reports_a_failure_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, "good 1").unwrap();
        let build = |contents: &Contents| -> Result<String, Vec<String>> {
            let text = String::from_utf8(contents[0].clone()).unwrap();
            if text.starts_with("good") {
                Ok(text)
            } else {
                Err(vec![format!("x.cert_file: {text}")])
            }
        };
        let (watch, first) = FileWatch::start(vec![("x.cert_file", path.clone())], build).unwrap();
        assert_eq!(first, "good 1");
        assert!(matches!(watch.reload(false, build), Reloaded::Unchanged));

        std::fs::write(&path, "good 2").unwrap();
        assert!(matches!(watch.reload(false, build), Reloaded::Applied(text) if text == "good 2"));

        // A bad read is reported once it reads the same twice (a replacement half-way is not).
        std::fs::write(&path, "bad").unwrap();
        assert!(matches!(watch.reload(false, build), Reloaded::Pending));
        assert!(
            matches!(watch.reload(false, build), Reloaded::Failed(p) if p == ["x.cert_file: bad"])
        );
        assert!(matches!(watch.reload(false, build), Reloaded::Pending));
        // A file that went missing is as bad, and SIGHUP reports at once.
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(watch.reload(true, build), Reloaded::Failed(p) if p[0].starts_with("x.cert_file: "))
        );
        assert!(matches!(watch.reload(true, build), Reloaded::Pending));

        // Back to what is in use: nothing to do; the same bad contents later are reported again.
        std::fs::write(&path, "good 2").unwrap();
        assert!(matches!(watch.reload(false, build), Reloaded::Unchanged));
        std::fs::write(&path, "bad").unwrap();
        assert!(matches!(watch.reload(true, build), Reloaded::Failed(_)));
    }
}
