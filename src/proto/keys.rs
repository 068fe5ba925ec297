//! Key ranges: how a region of an ordered store is named, and whether a file's keys lie
//! inside it.
//!
//! A region is the half-open range `[start, end)` of user keys, compared as bytes, the
//! way RocksDB's default comparator does. A file belongs to a region when all its keys
//! do; a file with keys on both sides of a boundary is *not aligned* and is refused,
//! never silently included or dropped, because either choice would lose or duplicate
//! data at the engine.

use std::fmt;

/// Why a key or a range did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A range without `..`.
    #[error("range {0:?} has no \"..\" (write START..END)")]
    NoDots(String),
    /// A `0x` key that is not hex.
    #[error("key {0:?} is not valid hex after 0x")]
    BadHex(String),
    /// A range whose end is not above its start.
    #[error("empty range: start {start} is not below end {end}")]
    Empty {
        /// The range's start.
        start: Key,
        /// The range's end.
        end: Key,
    },
}

/// A user key: bytes, shown as UTF-8 when printable and as `0x…` hex otherwise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key(pub Vec<u8>);

impl Key {
    /// Parses `0x`-prefixed hex, or takes the text's UTF-8 bytes.
    pub fn parse(s: &str) -> Result<Key, KeyError> {
        match s.strip_prefix("0x") {
            Some(h) => unhex(h).map(Key).ok_or_else(|| KeyError::BadHex(s.to_string())),
            None => Ok(Key(s.as_bytes().to_vec())),
        }
    }

    /// Lower-case hex without prefix (for JSON and machine use).
    pub fn hex(&self) -> String {
        super::blocks::hex(&self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let printable = |s: &str| !s.starts_with("0x") && s.chars().all(|c| c.is_ascii_graphic() || c == ' ');
        match std::str::from_utf8(&self.0) {
            Ok(s) if !s.is_empty() && printable(s) => f.write_str(s),
            _ => write!(f, "0x{}", self.hex()),
        }
    }
}

fn unhex(h: &str) -> Option<Vec<u8>> {
    if h.len() % 2 != 0 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

/// The smallest and largest user key of a file, both inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpan {
    /// Smallest user key.
    pub smallest: Key,
    /// Largest user key.
    pub largest: Key,
}

impl fmt::Display for KeySpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.smallest, self.largest)
    }
}

/// A region `[start, end)`; an empty start is the first key, no end is past the last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRange {
    /// First key in the range; empty: the first key there is.
    pub start: Key,
    /// First key past the range; `None`: past the last key.
    pub end: Option<Key>,
}

/// Where a file's keys lie relative to a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Every key is in the range.
    Inside,
    /// No key is in the range.
    Outside,
    /// Keys on both sides of this boundary key.
    Straddles(Key),
}

impl KeyRange {
    /// Parses `START..END`, `START..` or `..END`; each key UTF-8 or `0x`-hex.
    pub fn parse(s: &str) -> Result<KeyRange, KeyError> {
        let (a, b) = s.split_once("..").ok_or_else(|| KeyError::NoDots(s.to_string()))?;
        let start = Key::parse(a)?;
        let end = match b {
            "" => None,
            b => Some(Key::parse(b)?),
        };
        if let Some(end) = end.as_ref().filter(|e| **e <= start) {
            return Err(KeyError::Empty {
                start,
                end: end.clone(),
            });
        }
        Ok(KeyRange { start, end })
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &Key) -> bool {
        *key >= self.start && self.end.as_ref().is_none_or(|e| key < e)
    }

    /// Whether `span` lies inside, outside, or across a boundary of this range.
    pub fn place(&self, span: &KeySpan) -> Placement {
        let (lo, hi) = (self.contains(&span.smallest), self.contains(&span.largest));
        match (lo, hi) {
            (true, true) => Placement::Inside,
            (true, false) => Placement::Straddles(self.end.clone().expect("an end exists past a contained key")),
            (false, true) => Placement::Straddles(self.start.clone()),
            (false, false) => {
                let below = span.largest < self.start;
                let above = self.end.as_ref().is_some_and(|e| span.smallest >= *e);
                match below || above {
                    true => Placement::Outside,
                    false => Placement::Straddles(self.start.clone()),
                }
            }
        }
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.start.0.is_empty(), &self.end) {
            (true, None) => f.write_str(".."),
            (_, None) => write!(f, "{}..", self.start),
            (true, Some(e)) => write!(f, "..{e}"),
            (false, Some(e)) => write!(f, "{}..{e}", self.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(a: &str, b: &str) -> KeySpan {
        KeySpan {
            smallest: Key::parse(a).unwrap(),
            largest: Key::parse(b).unwrap(),
        }
    }

    #[test]
    fn ranges_parse_in_text_and_hex() {
        let r = KeyRange::parse("b..0x6400ff").unwrap();
        assert_eq!(r.start, Key(b"b".to_vec()));
        assert_eq!(r.end, Some(Key(vec![0x64, 0x00, 0xff])));
        assert_eq!(KeyRange::parse("..m").unwrap().start, Key::default());
        assert_eq!(KeyRange::parse("m..").unwrap().end, None);
        assert!(matches!(KeyRange::parse("abc"), Err(KeyError::NoDots(_))));
        assert!(matches!(KeyRange::parse("0xzz..b"), Err(KeyError::BadHex(_))));
        assert!(matches!(KeyRange::parse("0x1..b"), Err(KeyError::BadHex(_))));
        assert!(matches!(KeyRange::parse("b..a"), Err(KeyError::Empty { .. })));
        assert!(matches!(KeyRange::parse("b..b"), Err(KeyError::Empty { .. })));
    }

    #[test]
    fn files_are_placed_against_the_half_open_range() {
        let r = KeyRange::parse("b..d").unwrap();
        assert_eq!(r.place(&span("b", "c~")), Placement::Inside);
        assert_eq!(r.place(&span("a", "az")), Placement::Outside);
        assert_eq!(r.place(&span("d", "e")), Placement::Outside, "end is exclusive");
        assert_eq!(r.place(&span("a", "b")), Placement::Straddles(Key(b"b".to_vec())));
        assert_eq!(r.place(&span("c", "d")), Placement::Straddles(Key(b"d".to_vec())));
        assert_eq!(r.place(&span("a", "z")), Placement::Straddles(Key(b"b".to_vec())));
        let open = KeyRange::parse("b..").unwrap();
        assert_eq!(open.place(&span("x", "0xffff")), Placement::Inside);
    }

    #[test]
    fn binary_keys_print_as_hex() {
        assert_eq!(Key(vec![0, 0xff]).to_string(), "0x00ff");
        assert_eq!(Key(b"user/1".to_vec()).to_string(), "user/1");
        assert_eq!(Key(b"0xab".to_vec()).to_string(), "0x30786162");
        let r = KeyRange::parse("0x00..k").unwrap();
        assert_eq!(r.to_string(), "0x00..k");
    }
}
