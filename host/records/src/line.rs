//! Writing record lines: the bytes `serde_json` writes for the same values, written directly.
//!
//! Every check with `capture = "input"` writes a line of ~1.3 KB, most of it strings. The
//! `Serialize` impls of the record types stay the reference (replay reads lines with them, and
//! tests hold these writers to them byte for byte); the decision log writes with these, which
//! skip clean runs of a string eight bytes at a time where `serde_json` looks at every byte,
//! and do not go through serde's visitor calls.

/// A JSON object being written to a line: fields are added in order, `,` between them.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    /// Open an object at the end of `out`.
    #[inline]
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, first: true }
    }

    /// Write `"name":` and return the line, for the field's value. `name` is written as it
    /// is: it must be a JSON-safe literal (the record's field names are).
    #[inline]
    pub fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// A string field.
    #[inline]
    pub fn str(&mut self, name: &str, value: &str) {
        str(self.key(name), value);
    }

    /// A string field written as `null` when absent.
    #[inline]
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(value) => self.str(name, value),
            None => self.key(name).extend_from_slice(b"null"),
        }
    }

    /// A string field left out when absent.
    #[inline]
    pub fn some_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(name, value);
        }
    }

    /// An unsigned integer field.
    #[inline]
    pub fn u64(&mut self, name: &str, value: u64) {
        u64(self.key(name), value);
    }

    /// An unsigned integer field written as `null` when absent.
    #[inline]
    pub fn opt_u64(&mut self, name: &str, value: Option<u64>) {
        match value {
            Some(value) => self.u64(name, value),
            None => self.key(name).extend_from_slice(b"null"),
        }
    }

    /// An unsigned integer field left out when absent.
    #[inline]
    pub fn some_u64(&mut self, name: &str, value: Option<u64>) {
        if let Some(value) = value {
            self.u64(name, value);
        }
    }

    /// A boolean field.
    #[inline]
    pub fn bool(&mut self, name: &str, value: bool) {
        self.key(name).extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// An array of strings.
    pub fn strs<'s>(&mut self, name: &str, values: impl IntoIterator<Item = &'s str>) {
        strs(self.key(name), values);
    }

    /// An array of `[name, value]` pairs of strings.
    pub fn pairs<'s>(&mut self, name: &str, pairs: impl IntoIterator<Item = (&'s str, &'s str)>) {
        array(self.key(name), pairs, |out, (name, value)| strs(out, [name, value]));
    }

    /// Close the object.
    #[inline]
    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// `items` as a JSON array, each written by `write`.
pub fn array<T>(out: &mut Vec<u8>, items: impl IntoIterator<Item = T>, mut write: impl FnMut(&mut Vec<u8>, T)) {
    out.push(b'[');
    for (n, item) in items.into_iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

/// `values` as a JSON array of strings.
pub fn strs<'s>(out: &mut Vec<u8>, values: impl IntoIterator<Item = &'s str>) {
    array(out, values, str);
}

/// `value` in decimal.
pub fn u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// The high bit of each byte of `word` (little-endian) that is below 0x20, a `"` or a `\`,
/// exact up to and including the first such byte: borrows may set bits above it, so only the
/// lowest set bit, or whether any is set, is used.
#[inline]
fn needs_escape(word: u64) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    control | zero_byte(word ^ (ONES * u64::from(b'"'))) | zero_byte(word ^ (ONES * u64::from(b'\\')))
}

/// The index in `bytes` of the first byte that needs an escape, looking eight bytes at a time.
#[inline]
fn next_escape(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(word) = bytes[at..].first_chunk::<8>() {
        let found = needs_escape(u64::from_le_bytes(*word));
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    // The last 0–7 bytes, one at a time (copying them into a padded word stalls the load).
    bytes[at..].iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\').map(|end| at + end)
}

/// `value` as a JSON string, escaped exactly as `serde_json` escapes it: `"` and `\`, the
/// control characters (`\b`, `\t`, `\n`, `\f`, `\r` by name, the others as `\u00xx`), and
/// nothing else (not DEL, not non-ASCII characters).
pub fn str(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    while let Some(at) = next_escape(bytes) {
        out.extend_from_slice(&bytes[..at]);
        let byte = bytes[at];
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        bytes = &bytes[at + 1..];
    }
    out.extend_from_slice(bytes);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_byte_that_needs_an_escape_is_found_in_every_position_of_a_word() {
        for byte in 0..=u8::MAX {
            for position in 0..8 {
                let mut word = [b'a'; 8];
                word[position] = byte;
                let found = needs_escape(u64::from_le_bytes(word)) != 0;
                assert_eq!(found, byte < 0x20 || byte == b'"' || byte == b'\\', "byte {byte:#04x} at {position}");
            }
        }
    }

    #[test]
    fn the_first_byte_that_needs_an_escape_is_found_wherever_it_is() {
        for len in 0..20 {
            for at in 0..=len {
                for byte in [b'"', b'\\', 0, 0x1f] {
                    let mut bytes = vec![b'x'; len];
                    if at < len {
                        bytes[at] = byte;
                        // Bytes after the first one that need escapes too do not move it.
                        bytes[at + 1..].fill(b'"');
                    }
                    assert_eq!(next_escape(&bytes), (at < len).then_some(at), "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let all_ascii: String = (0..=0x7fu8).map(char::from).collect();
        for text in ["", "plain", "\"", "\\", "a\u{7f}é€😀", "0123456789abcdef\"0123456789", all_ascii.as_str()] {
            let mut out = Vec::new();
            str(&mut out, text);
            assert_eq!(String::from_utf8_lossy(&out), serde_json::to_string(text).unwrap_or_default(), "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(text in prop_oneof![
            any::<String>(),
            "[a-z\"\\\\\u{0}-\u{1f}\u{7f}é€😀]{0,40}",
            "[a-zA-Z0-9 /:.-]{0,64}",
        ]) {
            let mut out = Vec::new();
            str(&mut out, &text);
            prop_assert_eq!(String::from_utf8_lossy(&out), serde_json::to_string(&text).unwrap_or_default());
        }

        #[test]
        fn numbers_and_arrays_are_written_as_serde_json_writes_them(
            value in any::<u64>(),
            values in proptest::collection::vec(any::<String>(), 0..4),
        ) {
            let mut out = Vec::new();
            u64(&mut out, value);
            strs(&mut out, values.iter().map(String::as_str));
            let expected = format!("{}{}", serde_json::to_string(&value).unwrap_or_default(), serde_json::to_string(&values).unwrap_or_default());
            prop_assert_eq!(String::from_utf8_lossy(&out), expected);
        }
    }
}
