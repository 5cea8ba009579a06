//! The one scan JSON strings need on the hot path, shared by the log writer and the signature
//! parser. Pure, no I/O.

/// How many leading bytes need no special treatment inside a JSON string: the log writer escapes
/// what follows them, the signature parser unescapes it or refuses a control character.
///
/// Every callback and every log line goes through here, mostly with nothing to escape, so eight
/// bytes are tested at a time (the last word overlapping the one before); only a word that holds
/// a byte to stop at, or a string shorter than a word, is looked at byte by byte.
#[inline]
pub fn plain_prefix_len(bytes: &[u8]) -> usize {
    let bytewise_from = |start: usize| {
        start
            + bytes[start..]
                .iter()
                .position(|&byte| byte < 0x20 || byte == b'"' || byte == b'\\')
                .unwrap_or(bytes.len() - start)
    };
    let word_at =
        |start: usize| -> [u8; 8] { bytes[start..start + 8].try_into().expect("eight bytes") };
    let mut plain = 0;
    while plain + 8 <= bytes.len() {
        if may_need_escape(word_at(plain)) {
            return bytewise_from(plain);
        }
        plain += 8;
    }
    if plain == bytes.len() || (plain >= 8 && !may_need_escape(word_at(bytes.len() - 8))) {
        return bytes.len();
    }
    bytewise_from(plain)
}

/// Whether any of the eight bytes is below 0x20, a quote or a backslash (the classic "has a zero
/// byte" and "has a byte less than" word tricks; they never miss, and may only flag bytes after
/// one that does match, which the caller's byte-wise scan then sorts out).
#[inline]
fn may_need_escape(word: [u8; 8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH_BITS: u64 = u64::from_ne_bytes([0x80; 8]);
    let word = u64::from_ne_bytes(word);
    let has_zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGH_BITS;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH_BITS;
    let quote = has_zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero_byte(word ^ (ONES * u64::from(b'\\')));
    below_space | quote | backslash != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_prefix_ends_at_the_first_byte_to_escape() {
        for special in [b'"', b'\\', b'\n', 0x00, 0x1f] {
            for at in 0..24 {
                let mut bytes = vec![b'a'; 24];
                bytes[at] = special;
                assert_eq!(plain_prefix_len(&bytes), at, "{special:#x} at {at}");
            }
        }
        for len in 0..20 {
            assert_eq!(plain_prefix_len(&vec![b'a'; len]), len);
        }
        assert_eq!(plain_prefix_len("é😀 ~\x7f".as_bytes()), "é😀 ~\x7f".len());
    }
}
