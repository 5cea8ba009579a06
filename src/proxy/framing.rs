//! What hyper does not show: whether a request head carried `Content-Length` together with
//! `Transfer-Encoding`.
//!
//! hyper reads such a request by its chunked framing and closes the connection after it
//! (RFC 9112 §6.1), but it drops `Content-Length` from the header map, so the service cannot tell
//! it from a plainly chunked request. lfguard refuses it (the request-smuggling shape, which
//! other parsers on the way may frame differently), so it watches the bytes of each connection as
//! hyper reads them: `Watched` wraps the socket, and `Scanner` follows the messages, finding each
//! head's end and framing headers as hyper's parser (httparse) reads them and skipping each body
//! as hyper frames it (`Content-Length`, or the chunked coding exactly as hyper decodes it),
//! noting which request of the connection, counted from 0, had both headers. The service counts
//! the requests hyper gives it (`HeadWatch::next_request_is_ambiguous`) and refuses that one. Both
//! run in the connection's task: hyper cannot parse a head before the scanner has seen its bytes.
//!
//! Where hyper refuses a message (a malformed head, bad framing, a limit) the connection ends, so
//! the scanner need not agree with hyper past that point; where hyper accepts one, the scanner
//! reads it the same way (the unit tests hold it to httparse). It does not validate heads, which
//! keeps it to a scan for line ends: a few hundred instructions a request. Should it ever lose
//! track all the same, it stops watching, and the connection gets hyper's own handling (chunked
//! framing wins, the connection closes afterwards).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const NONE: u64 = u64::MAX;

/// Shared by a connection's `Watched` socket and the service serving its requests.
#[derive(Debug)]
pub struct HeadWatch {
    /// The index of the first request whose head had both `Content-Length` and
    /// `Transfer-Encoding` (hyper reads no request after it), or `NONE`.
    ambiguous: AtomicU64,
    /// Requests handed to the service so far.
    requests: AtomicU64,
}

impl Default for HeadWatch {
    fn default() -> Self {
        HeadWatch {
            ambiguous: AtomicU64::new(NONE),
            requests: AtomicU64::new(0),
        }
    }
}

impl HeadWatch {
    /// Called once for every request the service is given, in order: whether that request's
    /// head had both `Content-Length` and `Transfer-Encoding`.
    pub fn next_request_is_ambiguous(&self) -> bool {
        let index = self.requests.fetch_add(1, Ordering::Relaxed);
        self.ambiguous.load(Ordering::Relaxed) == index
    }
}

/// A socket whose incoming bytes a `Scanner` reads along with hyper.
pub struct Watched<S> {
    inner: S,
    scanner: Scanner,
    watch: Arc<HeadWatch>,
}

impl<S> Watched<S> {
    /// `max_head_bytes`: a longer head is refused by hyper (`server.max_header_bytes`).
    pub fn new(inner: S, watch: Arc<HeadWatch>, max_head_bytes: usize) -> Self {
        Watched {
            inner,
            scanner: Scanner::new(max_head_bytes),
            watch,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            if let Some(index) = this.scanner.feed(&buf.filled()[before..]) {
                this.watch.ambiguous.store(index, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the scanner is in the stream of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Body bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunk),
    /// Past an ambiguous head (hyper reads nothing after it) or lost: watch no more.
    Stopped,
}

/// hyper's chunked decoder, step for step (its `ChunkedState`), without its limits: past a limit
/// hyper ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// Follows the requests of one connection; see the module documentation.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// The start of a head not yet complete.
    pending: Vec<u8>,
    /// Complete heads seen so far.
    heads: u64,
    max_head_bytes: usize,
}

/// How a head frames its body, as hyper decides it for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Body(State),
    /// Both `Content-Length` and `Transfer-Encoding`.
    Ambiguous,
}

impl Scanner {
    pub fn new(max_head_bytes: usize) -> Self {
        Scanner {
            state: State::Head,
            pending: Vec::new(),
            heads: 0,
            max_head_bytes,
        }
    }

    /// Reads the next bytes of the connection. Returns the index of a request whose head had
    /// both `Content-Length` and `Transfer-Encoding`, once, when its head is complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<u64> {
        if self.state == State::Stopped || bytes.is_empty() {
            return None;
        }
        if self.pending.is_empty() {
            return self.scan(bytes);
        }
        let mut joined = std::mem::take(&mut self.pending);
        joined.extend_from_slice(bytes);
        self.scan(&joined)
    }

    fn scan(&mut self, mut bytes: &[u8]) -> Option<u64> {
        while !bytes.is_empty() {
            match self.state {
                State::Stopped => return None,
                State::Head => match head(bytes) {
                    Some((length, Framing::Body(next))) => {
                        self.heads += 1;
                        self.state = next;
                        bytes = &bytes[length..];
                    }
                    Some((_, Framing::Ambiguous)) => {
                        self.state = State::Stopped;
                        return Some(self.heads);
                    }
                    None if bytes.len() <= self.max_head_bytes => {
                        self.pending.extend_from_slice(bytes);
                        return None;
                    }
                    None => self.state = State::Stopped,
                },
                State::Length(left) => {
                    let taken = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[taken..];
                    let left = left - taken as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let taken = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[taken..];
                    let left = left - taken as u64;
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                State::Chunked(chunk) => {
                    self.state = match chunk_step(chunk, bytes[0]) {
                        Some(None) => State::Head,
                        Some(Some(next)) => State::Chunked(next),
                        None => State::Stopped,
                    };
                    bytes = &bytes[1..];
                }
            }
        }
        None
    }
}

/// The end of the request head at the start of `bytes` and how it frames its body, or `None`
/// while it is incomplete. Read as httparse reads every head it accepts: empty lines before the
/// request line are skipped, a line ends in LF or CRLF, the first empty line ends the head, and a
/// header is `name:value` (no blank before the colon) with blanks around the value trimmed.
/// Heads httparse refuses end the connection, so how they are read here does not matter.
fn head(bytes: &[u8]) -> Option<(usize, Framing)> {
    let mut start = 0;
    loop {
        match &bytes[start..] {
            [b'\r', b'\n', ..] => start += 2,
            [b'\n', ..] => start += 1,
            [] | [b'\r'] => return None,
            _ => break,
        }
    }
    let mut transfer_encoding = None;
    let mut content_length = None;
    let mut line_start = start;
    for newline in memchr::memchr_iter(b'\n', &bytes[start..]) {
        let line = &bytes[line_start..start + newline];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let request_line = line_start == start;
        line_start = start + newline + 1;
        if request_line {
            continue;
        }
        if line.is_empty() {
            return Some((line_start, framing(transfer_encoding, content_length)));
        }
        if let Some(value) = header_value(line, b"transfer-encoding") {
            transfer_encoding = Some(is_chunked(value));
        } else if content_length.is_none()
            && let Some(value) = header_value(line, b"content-length")
        {
            content_length = Some(digits(value));
        }
    }
    None
}

/// The value of a header line if its name is `name` (lowercase), in any case.
fn header_value<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let value = line.get(name.len() + 1..)?;
    (line[name.len()] == b':' && line[..name.len()].eq_ignore_ascii_case(name))
        .then(|| value.trim_ascii())
}

/// hyper's request framing: the last `Transfer-Encoding` ending in `chunked` makes the body
/// chunked (any other is refused); else the first `Content-Length` (digits only); else no body.
fn framing(transfer_encoding: Option<bool>, content_length: Option<Option<u64>>) -> Framing {
    match (transfer_encoding, content_length) {
        (Some(_), Some(_)) => Framing::Ambiguous,
        (Some(true), None) => Framing::Body(State::Chunked(Chunk::Start)),
        (Some(false), None) | (None, Some(None)) => Framing::Body(State::Stopped),
        (None, Some(Some(0))) | (None, None) => Framing::Body(State::Head),
        (None, Some(Some(length))) => Framing::Body(State::Length(length)),
    }
}

/// `chunked` is the last coding of the value (hyper reads only visible ASCII values).
fn is_chunked(value: &[u8]) -> bool {
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
    {
        return false;
    }
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |length, &b| {
        let digit = (b as char).to_digit(10)?;
        length.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// One byte of the chunked coding outside chunk data: the next step, `Some(None)` when the body
/// ended, `None` where hyper refuses it.
fn chunk_step(chunk: Chunk, byte: u8) -> Option<Option<Chunk>> {
    let hex = |size: u64| {
        let digit = (byte as char).to_digit(16)?;
        size.checked_mul(16)?.checked_add(u64::from(digit))
    };
    let next = match (chunk, byte) {
        (Chunk::Start, _) => Chunk::Size(hex(0)?),
        (Chunk::Size(size), b'\t' | b' ') => Chunk::SizeLws(size),
        (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Chunk::Extension(size),
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => {
            Chunk::SizeLf(size)
        }
        (Chunk::Size(size), _) => Chunk::Size(hex(size)?),
        (Chunk::SizeLws(size), b'\t' | b' ') => Chunk::SizeLws(size),
        (Chunk::SizeLws(_), _) | (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(size), _) => Chunk::Extension(size),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::EndCr | Chunk::Trailer, _) if byte != b'\r' => Chunk::Trailer,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::EndLf, b'\n') => return Some(None),
        (Chunk::SizeLf(_) | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf, _)
        | (Chunk::EndCr | Chunk::Trailer, _)
        | (Chunk::Data(_), _) => return None,
    };
    Some(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `bytes` in pieces of `step` bytes; returns the ambiguous request's index.
    fn scan(bytes: &[u8], step: usize) -> Option<u64> {
        let mut scanner = Scanner::new(16 * 1024);
        let mut found = None;
        for piece in bytes.chunks(step) {
            if let Some(index) = scanner.feed(piece) {
                assert!(found.is_none(), "reported twice");
                found = Some(index);
            }
        }
        found
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn finds_the_request_with_both_headers_behind_others() {
        let post_cl = "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        // The chunk data holds a head with both headers: data, not a request.
        let decoy = "POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let post_chunked = format!(
            "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n{:x}\r\n{decoy}\r\n0\r\nTrailer: t\r\n\r\n",
            decoy.len()
        );
        let cl_te =
            "POST /e HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let te_cl =
            "POST /e HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n";
        let stream = format!("\r\n{GET}{post_cl}{post_chunked}{GET}");
        for step in [1, 2, 7, 4096] {
            assert_eq!(scan(stream.as_bytes(), step), None, "step {step}");
            for ambiguous in [cl_te, te_cl] {
                let with = format!("{stream}{ambiguous}{GET}");
                assert_eq!(scan(with.as_bytes(), step), Some(4), "step {step}");
            }
        }
        assert_eq!(scan(cl_te.as_bytes(), 3), Some(0));
        // Bare LF line endings, which httparse accepts, keep the scanner in step.
        let bare = format!("GET / HTTP/1.1\nHost: x\n\n{cl_te}");
        assert_eq!(scan(bare.as_bytes(), 5), Some(1));
    }

    #[test]
    fn stops_where_hyper_would_end_the_connection() {
        // Framing hyper refuses, then a head with both headers: hyper never reads the second.
        let cl_te = "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for bad in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n",
        ] {
            assert_eq!(
                scan(format!("{bad}{cl_te}").as_bytes(), 4096),
                None,
                "{bad:?}"
            );
        }
        // A head longer than the limit.
        let mut scanner = Scanner::new(16);
        assert_eq!(scanner.feed(b"GET /aaaaaaaaaaaaaaaaaaaaaaaa"), None);
        assert_eq!(scanner.state, State::Stopped);
    }

    #[test]
    fn chunked_coding_as_hyper_reads_it() {
        let framed = |body: &str| {
            let mut scanner = Scanner::new(16 * 1024);
            scanner.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
            scanner.feed(body.as_bytes());
            scanner.state
        };
        assert_eq!(framed("0\r\n\r\n"), State::Head);
        assert_eq!(framed("A \t;x\r\n0123456789\r\n0\r\n\r\n"), State::Head);
        assert_eq!(framed("1\r\nx\r\n0\r\nA: b\r\nC: d\r\n\r\n"), State::Head);
        assert_eq!(framed("1\r\nx"), State::Chunked(Chunk::DataCr));
        for refused in [
            "x\r\n",
            "1 1\r\n",
            "1;a\nb\r\n",
            "1\r\nxy",
            "1\nx\r\n0\r\n\r\n",
        ] {
            assert_eq!(framed(refused), State::Stopped, "{refused:?}");
        }
        assert_eq!(framed("fffffffffffffffff\r\n"), State::Stopped, "overflow");
        assert!(is_chunked(b"gzip, Chunked "));
        assert!(!is_chunked(b"chunked, gzip"));
        assert_eq!(digits(b"123"), Some(123));
        assert_eq!(digits(b"+1"), None);
        assert_eq!(digits(b""), None);
    }

    /// A head as httparse (hyper's parser, default settings) reads it: its length and framing,
    /// or `None` where it is incomplete or refused.
    fn httparse_head(bytes: &[u8]) -> Result<Option<(usize, Framing)>, ()> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(bytes) {
            Ok(httparse::Status::Complete(length)) => {
                let mut transfer_encoding = None;
                let mut content_length = None;
                for header in request.headers.iter() {
                    if header.name.eq_ignore_ascii_case("transfer-encoding") {
                        transfer_encoding = Some(is_chunked(header.value));
                    } else if header.name.eq_ignore_ascii_case("content-length")
                        && content_length.is_none()
                    {
                        content_length = Some(digits(header.value));
                    }
                }
                Ok(Some((length, framing(transfer_encoding, content_length))))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(()),
        }
    }

    fn generated_head() -> impl Strategy<Value = Vec<u8>> {
        let eol = || prop::sample::select(vec!["\r\n", "\n"]);
        let name = prop::sample::select(vec![
            "Content-Length",
            "content-length",
            "CONTENT-LENGTH",
            "Transfer-Encoding",
            "transfer-encoding",
            "TRANSFER-encoding",
            "TE",
            "Host",
            "X-Transfer-Encoding",
            "Content-Lengths",
            "Content_Length",
            "transfer-encodin",
        ]);
        let value = prop::sample::select(vec![
            "5",
            "0",
            "12",
            "007",
            "chunked",
            "Chunked",
            "gzip, chunked",
            "chunked, gzip",
            "abc",
            "",
            "1 2",
            "chunked,",
            "x:y",
        ]);
        let blank = || prop::sample::select(vec!["", " ", "\t", "  \t"]);
        let header = (name, blank(), value, blank(), eol())
            .prop_map(|(n, b1, v, b2, e)| format!("{n}:{b1}{v}{b2}{e}"));
        (
            prop::sample::select(vec!["", "\r\n", "\n", "\r\n\n"]),
            prop::sample::select(vec![
                "POST /p HTTP/1.1",
                "GET / HTTP/1.0",
                "PUT /a?b=c HTTP/1.1",
            ]),
            eol(),
            prop::collection::vec(header, 0..6),
            eol(),
            prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        )
            .prop_map(|(lead, line, e1, headers, end, mutation)| {
                let mut bytes = format!("{lead}{line}{e1}{}{end}", headers.concat()).into_bytes();
                if let Some((at, byte)) = mutation {
                    bytes.insert(at.index(bytes.len() + 1), byte);
                }
                bytes.extend_from_slice(b"BODY");
                bytes
            })
    }

    proptest! {
        /// Wherever httparse accepts a head, the scanner finds the same end and framing, and
        /// finds no end in any shorter prefix of it.
        #[test]
        fn heads_are_read_as_httparse_reads_them(bytes in generated_head()) {
            match httparse_head(&bytes) {
                Ok(Some((length, framing))) => {
                    prop_assert_eq!(head(&bytes), Some((length, framing)));
                    for prefix in 0..length {
                        prop_assert_eq!(head(&bytes[..prefix]), None, "prefix {}", prefix);
                    }
                }
                Ok(None) => prop_assert_eq!(head(&bytes), None),
                Err(()) => {}
            }
        }
    }

    #[test]
    fn the_service_side_counts_requests() {
        let watch = HeadWatch::default();
        watch.ambiguous.store(1, Ordering::Relaxed);
        assert!(!watch.next_request_is_ambiguous());
        assert!(watch.next_request_is_ambiguous());
        assert!(!watch.next_request_is_ambiguous());
    }
}
