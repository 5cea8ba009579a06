//! The JSON reader behind `Body::parse`: strict, allocation-light, over valid UTF-8 text. It keeps
//! what the signature needs and a general parser throws away (number tokens and nested values as
//! written, duplicate keys).

use std::borrow::Cow;

use super::{BodyError, MAX_DEPTH, Member, Value, malformed};
use crate::verify::json_text;

/// A strict, allocation-light JSON reader over valid UTF-8 text.
pub(super) struct JsonReader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> JsonReader<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        JsonReader {
            text,
            bytes: text.as_bytes(),
            pos: 0,
        }
    }

    pub(super) fn top_level_object(mut self) -> Result<Vec<Member<'a>>, BodyError> {
        self.skip_ws();
        match self.peek() {
            None => return Err(malformed("body is empty")),
            Some(b'{') => {}
            Some(_) => return Err(malformed("body is not a JSON object")),
        }
        self.pos += 1;
        // Callbacks have a handful of members (the SMS uplink six): one allocation, not one per
        // doubling.
        let mut members = Vec::with_capacity(16);
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                let key = self.string()?;
                self.expect_colon()?;
                let value = self.top_level_value()?;
                members.push(Member { key, value });
                if self.after_member(b'}')? {
                    break;
                }
            }
        }
        self.skip_ws();
        if self.pos != self.bytes.len() {
            return Err(malformed("trailing data after the JSON object"));
        }
        Ok(members)
    }

    fn top_level_value(&mut self) -> Result<Value<'a>, BodyError> {
        self.skip_ws();
        match self.peek() {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b'{' | b'[') => {
                let mut out = String::new();
                self.nested(&mut out, 1)?;
                Ok(Value::Nested(out))
            }
            Some(b'n') => {
                self.literal("null")?;
                Ok(Value::Null)
            }
            Some(b't') => Ok(Value::Token(self.literal("true")?)),
            Some(b'f') => Ok(Value::Token(self.literal("false")?)),
            Some(b'-' | b'0'..=b'9') => Ok(Value::Token(self.number()?)),
            Some(_) => Err(malformed("unexpected character where a value was expected")),
            None => Err(malformed("body ends where a value was expected")),
        }
    }

    /// Copies one value into `out` without whitespace, validating it and checking every nested
    /// object for duplicate keys.
    fn nested(&mut self, out: &mut String, depth: usize) -> Result<(), BodyError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!("nesting deeper than {MAX_DEPTH}")));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'"') => {
                let start = self.pos;
                self.string()?;
                out.push_str(&self.text[start..self.pos]);
            }
            Some(b'{') => {
                self.pos += 1;
                out.push('{');
                let mut keys = Vec::new();
                self.skip_ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                } else {
                    loop {
                        self.skip_ws();
                        let start = self.pos;
                        keys.push(self.string()?);
                        out.push_str(&self.text[start..self.pos]);
                        self.expect_colon()?;
                        out.push(':');
                        self.nested(out, depth + 1)?;
                        if self.after_member(b'}')? {
                            break;
                        }
                        out.push(',');
                    }
                }
                out.push('}');
                keys.sort_unstable();
                if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
                    return Err(BodyError::DuplicateKey(pair[0].to_string()));
                }
            }
            Some(b'[') => {
                self.pos += 1;
                out.push('[');
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                } else {
                    loop {
                        self.nested(out, depth + 1)?;
                        if self.after_member(b']')? {
                            break;
                        }
                        out.push(',');
                    }
                }
                out.push(']');
            }
            Some(b'n') => out.push_str(self.literal("null")?),
            Some(b't') => out.push_str(self.literal("true")?),
            Some(b'f') => out.push_str(self.literal("false")?),
            Some(b'-' | b'0'..=b'9') => out.push_str(self.number()?),
            Some(_) => return Err(malformed("unexpected character where a value was expected")),
            None => return Err(malformed("body ends where a value was expected")),
        }
        Ok(())
    }

    /// After a member or element: `true` at the closing bracket, `false` after a comma.
    fn after_member(&mut self, close: u8) -> Result<bool, BodyError> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(c) if c == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(malformed(format!(
                "expected ',' or '{}' at byte {}",
                close as char, self.pos
            ))),
        }
    }

    fn expect_colon(&mut self) -> Result<(), BodyError> {
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(malformed(format!("expected ':' at byte {}", self.pos)));
        }
        self.pos += 1;
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &'static str) -> Result<&'a str, BodyError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            let token = &self.text[self.pos..self.pos + word.len()];
            self.pos += word.len();
            Ok(token)
        } else {
            Err(malformed(format!("invalid literal at byte {}", self.pos)))
        }
    }

    /// A number token per RFC 8259: `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Result<&'a str, BodyError> {
        let start = self.pos;
        let invalid = |pos: usize| malformed(format!("invalid number at byte {pos}"));
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(invalid(start)),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(invalid(start));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(invalid(start));
            }
            self.digits();
        }
        Ok(&self.text[start..self.pos])
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string at `pos` (which must be `"`), unescaped; borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, BodyError> {
        if self.peek() != Some(b'"') {
            return Err(malformed(format!("expected a string at byte {}", self.pos)));
        }
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut run_start = start;
        loop {
            self.pos += json_text::plain_prefix_len(&self.bytes[self.pos..]);
            let Some(byte) = self.peek() else {
                return Err(malformed("unterminated string"));
            };
            match byte {
                b'"' => {
                    let run = &self.text[run_start..self.pos];
                    self.pos += 1;
                    return Ok(match owned {
                        Some(mut s) => {
                            s.push_str(run);
                            Cow::Owned(s)
                        }
                        None => Cow::Borrowed(run),
                    });
                }
                b'\\' => {
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    let decoded = self.escape()?;
                    s.push(decoded);
                    run_start = self.pos;
                }
                _ => {
                    return Err(malformed(format!(
                        "unescaped control character in string at byte {}",
                        self.pos
                    )));
                }
            }
        }
    }

    /// One escape after its backslash.
    fn escape(&mut self) -> Result<char, BodyError> {
        let at = self.pos;
        let byte = self
            .peek()
            .ok_or_else(|| malformed("unterminated string"))?;
        self.pos += 1;
        Ok(match byte {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                match first {
                    0xD800..=0xDBFF => {
                        if !self.bytes[self.pos..].starts_with(b"\\u") {
                            return Err(malformed(format!("lone surrogate escape at byte {at}")));
                        }
                        self.pos += 2;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(malformed(format!("lone surrogate escape at byte {at}")));
                        }
                        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                        char::from_u32(code).expect("surrogate pair is a scalar value")
                    }
                    0xDC00..=0xDFFF => {
                        return Err(malformed(format!("lone surrogate escape at byte {at}")));
                    }
                    _ => char::from_u32(first).expect("non-surrogate BMP code point"),
                }
            }
            _ => return Err(malformed(format!("invalid escape at byte {at}"))),
        })
    }

    fn hex4(&mut self) -> Result<u32, BodyError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| malformed("truncated \\u escape"))?;
        let mut value = 0u32;
        for &d in digits {
            let nibble = (d as char)
                .to_digit(16)
                .ok_or_else(|| malformed(format!("invalid \\u escape at byte {}", self.pos)))?;
            value = value * 16 + nibble;
        }
        self.pos += 4;
        Ok(value)
    }
}
