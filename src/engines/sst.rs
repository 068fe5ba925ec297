//! The smallest and largest user key of a RocksDB SST file, read from the file itself.
//!
//! A region-aligned export picks SST files by key range and refuses a file that straddles
//! the region's boundary, so barge must know each file's key range. Linking RocksDB for
//! that would be a heavy dependency for a handful of small reads, and index separators
//! cannot be trusted for it (RocksDB shortens them), so this module walks a block-based
//! table from its end: footer, metaindex, properties, index (and, for a partitioned
//! index, its first and last partition), then only the first and the last data block.
//!
//! Covered: format versions 0 to 7, no/snappy/zlib/lz4/lz4hc/zstd compression, binary
//! search, hash, partitioned and first-key indexes, index value delta encoding, and data
//! blocks with a hash index. Versions 6 and 7 (a different footer, the index handle in the
//! metaindex) follow RocksDB's format notes; the RocksDB tools here cannot write them.
//! Refused with a named error: other table formats, bzip2 and xpress, dictionary
//! compression, and anything that does not parse. Block checksums are not verified, but
//! every length and offset is: a truncated or garbage file gives an [`SstError`], never a
//! panic, and no block (stored or decompressed) above 64 MiB is read or allocated.
//!
//! Keys are not compared here: `smallest` is the file's first key and `largest` its last,
//! in the order of the file's comparator; with user-defined timestamps they keep their
//! timestamp suffix. Range deletions (kept in a separate meta block) do not count.

use std::io::{self, Read};
use std::path::Path;

const MAGIC: u64 = 0x88e2_41b7_85f4_cff7;
const LEGACY_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const PLAIN_MAGIC: u64 = 0x8242_2296_63bf_9564;
const LEGACY_PLAIN_MAGIC: u64 = 0x4f34_18eb_7a8f_13b8;
const CUCKOO_MAGIC: u64 = 0x9267_89d0_c5f1_7873;
/// Footer of format version 1 and later: checksum type, 40 bytes of handles or
/// extended fields, format version, magic.
const FOOTER_LEN: usize = 53;
/// Footer of format version 0 (legacy magic): 40 bytes of handles, magic.
const LEGACY_FOOTER_LEN: usize = 48;
/// Format version 6 and later start the footer's handle area with this.
const EXTENDED_MAGIC: [u8; 4] = [0x3e, 0x00, 0x7a, 0x00];
/// Compression type (1 byte) and checksum (4 bytes) after every block.
const TRAILER_LEN: usize = 5;
/// The largest block read or decompressed; RocksDB's blocks are a few KiB to a few MiB.
const MAX_BLOCK: usize = 64 << 20;
/// Above this block size the top bit of the restart count is not a hash-index flag.
const MAX_HASHED_BLOCK: usize = 1 << 16;

const NO_COMPRESSION: u8 = 0;
const SNAPPY: u8 = 1;
const ZLIB: u8 = 2;
const LZ4: u8 = 4;
const LZ4HC: u8 = 5;
const ZSTD: u8 = 7;
const ZSTD_NOT_FINAL: u8 = 0x40;

/// Index types recorded in the properties block (`BlockBasedTableOptions::IndexType`).
/// Binary search (0) and hash (1) indexes share one index block layout.
const INDEX_PARTITIONED: u32 = 2;
const INDEX_WITH_FIRST_KEY: u32 = 3;

/// The key range of one SST file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SstKeys {
    /// User key of the file's first entry (its internal key without the 8-byte
    /// sequence number and type).
    pub smallest: Vec<u8>,
    /// User key of the file's last entry.
    pub largest: Vec<u8>,
    /// The entry count the properties block records (`rocksdb.num.entries`), if any.
    pub entries_hint: Option<u64>,
}

/// Why an SST file's key range could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SstError {
    /// The file could not be read.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// Shorter than a footer; its size in bytes.
    #[error("too short for an sst file ({0} bytes)")]
    TooShort(u64),
    /// The footer's magic number is not a block-based table's.
    #[error("not a rocksdb block-based table")]
    NotBlockBased,
    /// A RocksDB table of another kind (plain, cuckoo).
    #[error("rocksdb {0} tables are not supported")]
    OtherTable(&'static str),
    /// A table format version this reader does not know.
    #[error("unsupported format version {0}")]
    FormatVersion(u32),
    /// A block compressed in a way this reader does not decompress.
    #[error("unsupported compression {}", compression_name(*.0))]
    Compression(u8),
    /// An index type this reader does not walk.
    #[error("unsupported index type {0}")]
    IndexType(u32),
    /// Some other table feature this reader does not read.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// The footer does not decode.
    #[error("corrupt footer")]
    CorruptFooter,
    /// A block (at this offset) does not decode.
    #[error("corrupt block at offset {0}")]
    CorruptBlock(u64),
    /// A block handle points past the end of the file.
    #[error("block at offset {offset} ({size} bytes) lies outside the file")]
    OutOfBounds {
        /// The block's offset.
        offset: u64,
        /// The block's size in bytes.
        size: u64,
    },
    /// A block handle names a block larger than this reader takes.
    #[error("block at offset {offset} is too large ({size} bytes)")]
    TooLarge {
        /// The block's offset.
        offset: u64,
        /// The block's size in bytes.
        size: u64,
    },
    /// The file ended inside a block (at this offset).
    #[error("short read at offset {0}")]
    ShortRead(u64),
    /// A table with no keys.
    #[error("empty table")]
    Empty,
}

fn compression_name(kind: u8) -> String {
    match kind {
        3 => "bzip2".into(),
        6 => "xpress".into(),
        other => format!("type {other:#04x}"),
    }
}

/// Reads the key range of the SST file at `path`.
pub fn read_keys(path: &Path) -> Result<SstKeys, SstError> {
    read_keys_from(&std::fs::File::open(path)?)
}

/// [`read_keys`] of a file already open.
pub fn read_keys_from(file: &std::fs::File) -> Result<SstKeys, SstError> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let read = |offset: u64, n: usize| {
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    keys_from_bytes(read, len)
}

/// Reads the key range of an SST file of `file_len` bytes through `read(offset, len)`,
/// which must return exactly `len` bytes from `offset`. Offsets and lengths are checked
/// against `file_len` before `read` is called.
pub fn keys_from_bytes(read: impl Fn(u64, usize) -> io::Result<Vec<u8>>, file_len: u64) -> Result<SstKeys, SstError> {
    let mut table = Table::open(read, file_len)?;
    let (first, last, entries_hint) = table.locate()?;
    let first_block = table.block(first, true)?;
    let smallest = first_user_key(&first_block).ok_or(SstError::CorruptBlock(first.offset))?;
    let last_block = if last == first {
        first_block
    } else {
        table.block(last, true)?
    };
    let largest = last_user_key(&last_block).ok_or(SstError::CorruptBlock(last.offset))?;
    Ok(SstKeys {
        smallest,
        largest,
        entries_hint,
    })
}

/// Where a block lies in the file (without its trailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle {
    offset: u64,
    size: u64,
}

struct Footer {
    format_version: u32,
    metaindex: Handle,
    /// In the footer up to format version 5, in the metaindex from 6 on.
    index: Option<Handle>,
}

/// How index entries are encoded.
#[derive(Debug, Clone, Copy)]
struct IndexFormat {
    /// Values without a length; a full handle at restart points, a size delta elsewhere.
    delta_values: bool,
    /// Each value carries the first key of its block after the handle.
    first_key: bool,
}

/// The names and raw values in a metaindex or properties block.
#[derive(Default)]
struct Named(Vec<(Vec<u8>, Vec<u8>)>);

impl Named {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// `None` if absent, `Some(None)` if present but not a block handle.
    fn handle(&self, name: &str) -> Option<Option<Handle>> {
        self.get(name).map(|v| Cursor::new(v).handle())
    }

    fn varint(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| Cursor::new(v).varint64())
    }
}

/// What the metaindex and the properties block say about the index.
struct Meta {
    index: Handle,
    format: IndexFormat,
    partitioned: bool,
    dictionary: bool,
    entries: Option<u64>,
}

struct Table<R> {
    read: R,
    len: u64,
    format_version: u32,
    /// Data blocks may be compressed with a dictionary (not supported).
    dictionary: bool,
    footer_index: Option<Handle>,
    metaindex: Handle,
}

impl<R: Fn(u64, usize) -> io::Result<Vec<u8>>> Table<R> {
    fn open(read: R, len: u64) -> Result<Self, SstError> {
        let tail_len = len.min(FOOTER_LEN as u64) as usize;
        if tail_len < LEGACY_FOOTER_LEN {
            return Err(SstError::TooShort(len));
        }
        let mut table = Table {
            read,
            len,
            format_version: 0,
            dictionary: false,
            footer_index: None,
            metaindex: Handle { offset: 0, size: 0 },
        };
        let footer = parse_footer(&table.read_at(len - tail_len as u64, tail_len)?, len)?;
        table.format_version = footer.format_version;
        table.footer_index = footer.index;
        table.metaindex = footer.metaindex;
        Ok(table)
    }

    /// Handles of the first and the last data block, and the entry count.
    fn locate(&mut self) -> Result<(Handle, Handle, Option<u64>), SstError> {
        let meta = self.meta()?;
        self.dictionary = meta.dictionary;
        let (first, last) = self.index_ends(meta.index, meta.format)?;
        if !meta.partitioned {
            return Ok((first, last, meta.entries));
        }
        if first == last {
            let (first, last) = self.index_ends(first, meta.format)?;
            return Ok((first, last, meta.entries));
        }
        let (first, _) = self.index_ends(first, meta.format)?;
        let (_, last) = self.index_ends(last, meta.format)?;
        Ok((first, last, meta.entries))
    }

    fn meta(&self) -> Result<Meta, SstError> {
        let metaindex = self.named_entries(self.metaindex)?;
        let corrupt = || SstError::CorruptBlock(self.metaindex.offset);
        let index = match self.footer_index {
            Some(index) => index,
            None => metaindex.handle("rocksdb.index").flatten().ok_or_else(corrupt)?,
        };
        let props = match metaindex
            .handle("rocksdb.properties")
            .or_else(|| metaindex.handle("rocksdb.stats"))
        {
            Some(handle) => self.named_entries(handle.ok_or_else(corrupt)?)?,
            None => Named::default(),
        };
        let index_type = props
            .get("rocksdb.block.based.table.index.type")
            .and_then(le32)
            .unwrap_or(0);
        if index_type > INDEX_WITH_FIRST_KEY {
            return Err(SstError::IndexType(index_type));
        }
        let delta = props.varint("rocksdb.index.value.is.delta.encoded").map(|v| v != 0);
        Ok(Meta {
            index,
            format: IndexFormat {
                delta_values: delta.unwrap_or(self.format_version >= 4),
                first_key: index_type == INDEX_WITH_FIRST_KEY,
            },
            partitioned: index_type == INDEX_PARTITIONED,
            dictionary: metaindex.get("rocksdb.compression_dict").is_some(),
            entries: props.varint("rocksdb.num.entries"),
        })
    }

    /// All entries of a metaindex or properties block: names and raw values.
    fn named_entries(&self, handle: Handle) -> Result<Named, SstError> {
        let data = self.block(handle, false)?;
        all_entries(&data).ok_or(SstError::CorruptBlock(handle.offset))
    }

    /// Handles in the first and the last entry of an index block.
    fn index_ends(&self, handle: Handle, format: IndexFormat) -> Result<(Handle, Handle), SstError> {
        let data = self.block(handle, false)?;
        if Block::parse(&data).is_some_and(|block| block.entries.is_empty()) {
            return Err(SstError::Empty);
        }
        index_ends(&data, format).ok_or(SstError::CorruptBlock(handle.offset))
    }

    /// A block's contents, decompressed. `data` marks data blocks, the only ones that
    /// may use a compression dictionary.
    fn block(&self, handle: Handle, data: bool) -> Result<Vec<u8>, SstError> {
        let too_large = SstError::TooLarge {
            offset: handle.offset,
            size: handle.size,
        };
        let size = usize::try_from(handle.size)
            .ok()
            .filter(|&s| s <= MAX_BLOCK)
            .ok_or(too_large)?;
        let mut raw = self.read_at(handle.offset, size + TRAILER_LEN)?;
        let kind = raw[size];
        raw.truncate(size);
        if data && self.dictionary && !matches!(kind, NO_COMPRESSION | SNAPPY) {
            return Err(SstError::Unsupported("dictionary compression"));
        }
        decompress(kind, raw, self.format_version, handle.offset)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SstError> {
        let outside = SstError::OutOfBounds {
            offset,
            size: len as u64,
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => {}
            _ => return Err(outside),
        }
        let buf = (self.read)(offset, len)?;
        if buf.len() != len {
            return Err(SstError::ShortRead(offset));
        }
        Ok(buf)
    }
}

/// Decodes the footer from the file's last (up to) 53 bytes.
fn parse_footer(tail: &[u8], file_len: u64) -> Result<Footer, SstError> {
    let n = tail.len();
    if n < LEGACY_FOOTER_LEN {
        return Err(SstError::TooShort(file_len));
    }
    match le64(&tail[n - 8..]) {
        Some(MAGIC) => {}
        Some(LEGACY_MAGIC) => return legacy_footer(&tail[n - LEGACY_FOOTER_LEN..]),
        Some(PLAIN_MAGIC | LEGACY_PLAIN_MAGIC) => return Err(SstError::OtherTable("plain")),
        Some(CUCKOO_MAGIC) => return Err(SstError::OtherTable("cuckoo")),
        _ => return Err(SstError::NotBlockBased),
    }
    if n < FOOTER_LEN {
        return Err(SstError::TooShort(file_len));
    }
    let footer = &tail[n - FOOTER_LEN..];
    let format_version = le32(&footer[41..45]).ok_or(SstError::CorruptFooter)?;
    match format_version {
        1..=5 => handles_footer(&footer[1..41], format_version),
        6 | 7 => extended_footer(footer, format_version, file_len),
        other => Err(SstError::FormatVersion(other)),
    }
}

fn legacy_footer(footer: &[u8]) -> Result<Footer, SstError> {
    handles_footer(&footer[..40], 0)
}

/// Metaindex and index handles, as in footers up to format version 5.
fn handles_footer(part: &[u8], format_version: u32) -> Result<Footer, SstError> {
    let mut cur = Cursor::new(part);
    let metaindex = cur.handle().ok_or(SstError::CorruptFooter)?;
    let index = cur.handle().ok_or(SstError::CorruptFooter)?;
    Ok(Footer {
        format_version,
        metaindex,
        index: Some(index),
    })
}

/// Format version 6 and later: extended magic, footer checksum, base context checksum,
/// metaindex size (the metaindex ends right before the footer), reserved bytes.
fn extended_footer(footer: &[u8], format_version: u32, file_len: u64) -> Result<Footer, SstError> {
    if footer[1..5] != EXTENDED_MAGIC {
        return Err(SstError::CorruptFooter);
    }
    if footer[33..41].iter().any(|&b| b != 0) {
        return Err(SstError::Unsupported("footer feature (newer rocksdb)"));
    }
    let size = le32(&footer[13..17]).ok_or(SstError::CorruptFooter)?;
    let footer_offset = file_len - FOOTER_LEN as u64;
    let offset = footer_offset
        .checked_sub(TRAILER_LEN as u64 + u64::from(size))
        .ok_or(SstError::CorruptFooter)?;
    Ok(Footer {
        format_version,
        metaindex: Handle {
            offset,
            size: u64::from(size),
        },
        index: None,
    })
}

fn decompress(kind: u8, raw: Vec<u8>, format_version: u32, offset: u64) -> Result<Vec<u8>, SstError> {
    // Up to format version 1, zlib blocks carry no size and lz4 blocks an 8-byte one.
    let sized = format_version >= 2;
    let out = match kind {
        NO_COMPRESSION => return Ok(raw),
        SNAPPY => snappy(&raw),
        ZLIB => size_prefix(&raw, sized).and_then(|(size, body)| inflate(body, size)),
        LZ4 | LZ4HC => lz4_size_prefix(&raw, sized).and_then(|(size, body)| lz4(body, size)),
        ZSTD | ZSTD_NOT_FINAL => size_prefix(&raw, true).and_then(|(size, body)| zstd(body, size?)),
        other => return Err(SstError::Compression(other)),
    };
    out.ok_or(SstError::CorruptBlock(offset))
}

/// The varint32 uncompressed size in front of a compressed block, if `present`.
fn size_prefix(raw: &[u8], present: bool) -> Option<(Option<usize>, &[u8])> {
    if !present {
        return Some((None, raw));
    }
    let mut cur = Cursor::new(raw);
    let size = cur.varint32()? as usize;
    (size <= MAX_BLOCK).then_some((Some(size), &raw[cur.pos..]))
}

fn lz4_size_prefix(raw: &[u8], sized: bool) -> Option<(usize, &[u8])> {
    if sized {
        let (size, body) = size_prefix(raw, true)?;
        return Some((size?, body));
    }
    // A little-endian size_t copied in by the writer.
    let size = usize::try_from(le64(raw.get(..8)?)?).ok()?;
    (size <= MAX_BLOCK).then_some((size, &raw[8..]))
}

fn snappy(raw: &[u8]) -> Option<Vec<u8>> {
    let size = snap::raw::decompress_len(raw).ok()?;
    if size > MAX_BLOCK {
        return None;
    }
    snap::raw::Decoder::new().decompress_vec(raw).ok()
}

/// RocksDB's zlib blocks are raw deflate streams (window bits -14).
fn inflate(body: &[u8], size: Option<usize>) -> Option<Vec<u8>> {
    read_capped(flate2::read::DeflateDecoder::new(body), size)
}

fn zstd(body: &[u8], size: usize) -> Option<Vec<u8>> {
    let decoder = ruzstd::decoding::StreamingDecoder::new(body).ok()?;
    read_capped(decoder, Some(size))
}

fn lz4(body: &[u8], size: usize) -> Option<Vec<u8>> {
    let mut out = vec![0; size];
    let n = lz4_flex::block::decompress_into(body, &mut out).ok()?;
    (n == size).then_some(out)
}

/// Reads a decoder to its end, at most [`MAX_BLOCK`] bytes; checks the size if known.
fn read_capped(reader: impl Read, size: Option<usize>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(MAX_BLOCK as u64 + 1).read_to_end(&mut out).ok()?;
    let fits = out.len() <= MAX_BLOCK && size.is_none_or(|size| size == out.len());
    fits.then_some(out)
}

/// A decompressed block split into its entries and its restart array.
struct Block<'a> {
    entries: &'a [u8],
    restarts: &'a [u8],
}

impl<'a> Block<'a> {
    /// Layout: entries, restart offsets (u32 each), [hash index buckets, bucket count
    /// (u16)], then a u32 whose top bit marks the hash index and whose rest counts the
    /// restarts. In blocks above 64 KiB the whole u32 is the count.
    fn parse(data: &'a [u8]) -> Option<Block<'a>> {
        let mut end = data.len().checked_sub(4)?;
        let word = le32(&data[end..])?;
        let hashed = data.len() <= MAX_HASHED_BLOCK && word >> 31 == 1;
        let restarts = if data.len() <= MAX_HASHED_BLOCK {
            word & 0x7fff_ffff
        } else {
            word
        };
        if hashed {
            let buckets = le16(&data[end.checked_sub(2)?..end])?;
            end = end.checked_sub(2 + usize::from(buckets))?;
        }
        let start = end.checked_sub((restarts as usize).checked_mul(4)?)?;
        if restarts == 0 {
            return None;
        }
        Some(Block {
            entries: &data[..start],
            restarts: &data[start..end],
        })
    }

    fn last_restart(&self) -> Option<usize> {
        let offset = le32(self.restarts.get(self.restarts.len().checked_sub(4)?..)?)? as usize;
        (offset < self.entries.len()).then_some(offset)
    }
}

/// The shared-prefix length and, if the block stores one, the value length of an entry.
struct EntryHead {
    shared: usize,
    value_len: Option<usize>,
}

/// Walks entries: varint32 shared, varint32 non-shared, [varint32 value length], key
/// delta, value.
struct Entries<'a> {
    cur: Cursor<'a>,
    key: Vec<u8>,
    value_len_prefixed: bool,
}

impl<'a> Entries<'a> {
    /// Starts at `pos`, which must be a restart point (the key starts empty).
    fn at(block: &Block<'a>, pos: usize, value_len_prefixed: bool) -> Self {
        Entries {
            cur: Cursor {
                buf: block.entries,
                pos,
            },
            key: Vec::new(),
            value_len_prefixed,
        }
    }

    /// Decodes the next key into `self.key`, leaving the cursor at the value.
    fn next_key(&mut self) -> Option<EntryHead> {
        let shared = self.cur.varint32()? as usize;
        let non_shared = self.cur.varint32()? as usize;
        let value_len = match self.value_len_prefixed {
            true => Some(self.cur.varint32()? as usize),
            false => None,
        };
        if shared > self.key.len() {
            return None;
        }
        self.key.truncate(shared);
        self.key.extend_from_slice(self.cur.take(non_shared)?);
        Some(EntryHead { shared, value_len })
    }

    /// Skips a value whose length the entry stored.
    fn skip_value(&mut self, head: &EntryHead) -> Option<()> {
        self.cur.take(head.value_len?).map(|_| ())
    }
}

/// Every key and value of a block whose values carry their length.
fn all_entries(data: &[u8]) -> Option<Named> {
    let block = Block::parse(data)?;
    let mut entries = Entries::at(&block, 0, true);
    let mut out = Vec::new();
    while !entries.cur.done() {
        let head = entries.next_key()?;
        let value = entries.cur.take(head.value_len?)?;
        out.push((entries.key.clone(), value.to_vec()));
    }
    Some(Named(out))
}

fn first_user_key(data: &[u8]) -> Option<Vec<u8>> {
    let block = Block::parse(data)?;
    let mut entries = Entries::at(&block, 0, true);
    entries.next_key()?;
    user_key(&entries.key)
}

fn last_user_key(data: &[u8]) -> Option<Vec<u8>> {
    let block = Block::parse(data)?;
    let mut entries = Entries::at(&block, block.last_restart()?, true);
    loop {
        let head = entries.next_key()?;
        entries.skip_value(&head)?;
        if entries.cur.done() {
            return user_key(&entries.key);
        }
    }
}

/// A data block key is an internal key: the user key, then 8 bytes of sequence and type.
fn user_key(internal: &[u8]) -> Option<Vec<u8>> {
    let len = internal.len().checked_sub(8)?;
    Some(internal[..len].to_vec())
}

/// The handles in the first and the last entry of an index block.
fn index_ends(data: &[u8], format: IndexFormat) -> Option<(Handle, Handle)> {
    let block = Block::parse(data)?;
    let mut entries = Entries::at(&block, 0, !format.delta_values);
    let head = entries.next_key()?;
    let first = index_value(&mut entries, &head, None, format)?;
    let mut entries = Entries::at(&block, block.last_restart()?, !format.delta_values);
    let mut last = None;
    loop {
        let head = entries.next_key()?;
        last = Some(index_value(&mut entries, &head, last, format)?);
        if entries.cur.done() {
            return Some((first, last?));
        }
    }
}

/// Decodes an index value. Delta-encoded values are a full handle where the key shares
/// nothing with the previous one (restart points), else a signed size delta from the
/// previous handle, whose block (and trailer) this one follows.
fn index_value(entries: &mut Entries, head: &EntryHead, prev: Option<Handle>, format: IndexFormat) -> Option<Handle> {
    if let Some(len) = head.value_len {
        return Cursor::new(entries.cur.take(len)?).handle();
    }
    let cur = &mut entries.cur;
    let handle = match prev.filter(|_| head.shared != 0) {
        Some(prev) => Handle {
            offset: prev.offset.checked_add(prev.size)?.checked_add(TRAILER_LEN as u64)?,
            size: prev.size.checked_add_signed(cur.signed_varint64()?)?,
        },
        None => cur.handle()?,
    };
    if format.first_key {
        let len = cur.varint32()? as usize;
        cur.take(len)?;
    }
    Some(handle)
}

/// Reads varints and byte runs from a slice; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn varint64(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1)?.first()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }

    fn varint32(&mut self) -> Option<u32> {
        u32::try_from(self.varint64()?).ok()
    }

    /// Zigzag-encoded signed varint.
    fn signed_varint64(&mut self) -> Option<i64> {
        let raw = self.varint64()?;
        Some((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    fn handle(&mut self) -> Option<Handle> {
        Some(Handle {
            offset: self.varint64()?,
            size: self.varint64()?,
        })
    }
}

fn le16(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?))
}

fn le32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn le64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    type Entry = (Vec<u8>, Vec<u8>);

    fn keys_of(bytes: &[u8]) -> Result<SstKeys, SstError> {
        let read = |offset: u64, len: usize| Ok(bytes[offset as usize..offset as usize + len].to_vec());
        keys_from_bytes(read, bytes.len() as u64)
    }

    // Synthetic tables, written from the format notes, for tests that need no RocksDB.

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn handle_bytes(h: Handle) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, h.offset);
        put_varint(&mut out, h.size);
        out
    }

    /// A block with a restart at every entry; `value_len` false leaves out value lengths
    /// (a delta-encoded index block whose values are all full handles).
    fn block(entries: &[(&[u8], &[u8])], value_len: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut restarts = vec![];
        for (key, value) in entries {
            restarts.push(out.len() as u32);
            put_varint(&mut out, 0);
            put_varint(&mut out, key.len() as u64);
            if value_len {
                put_varint(&mut out, value.len() as u64);
            }
            out.extend_from_slice(key);
            out.extend_from_slice(value);
        }
        if restarts.is_empty() {
            restarts.push(0);
        }
        for r in &restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
        out
    }

    fn internal(user: &[u8]) -> Vec<u8> {
        [user, &[1, 0, 0, 0, 0, 0, 0, 0]].concat()
    }

    fn append(file: &mut Vec<u8>, block: &[u8]) -> Handle {
        let handle = Handle {
            offset: file.len() as u64,
            size: block.len() as u64,
        };
        file.extend_from_slice(block);
        file.extend_from_slice(&[NO_COMPRESSION, 0, 0, 0, 0]);
        handle
    }

    /// Two data blocks ("apple".."banana", "cherry".."date"), an index and a metaindex.
    /// Up to format version 5 the footer holds both handles; from 6 on the metaindex
    /// sits right before the footer and holds the index handle.
    fn synthetic(format_version: u32) -> Vec<u8> {
        let mut file = Vec::new();
        let (apple, banana, cherry, date) = (
            internal(b"apple"),
            internal(b"banana"),
            internal(b"cherry"),
            internal(b"date"),
        );
        let a = append(&mut file, &block(&[(&apple, b"1"), (&banana, b"2")], true));
        let b = append(&mut file, &block(&[(&cherry, b"3"), (&date, b"4")], true));
        let delta = format_version >= 4;
        let index = block(&[(b"b", &handle_bytes(a)), (b"e", &handle_bytes(b))], !delta);
        let mut footer = vec![1u8];
        if format_version <= 5 {
            let meta = append(&mut file, &block(&[], true));
            let index = append(&mut file, &index);
            footer.extend(handle_bytes(meta));
            footer.extend(handle_bytes(index));
            footer.resize(41, 0);
        } else {
            let index = append(&mut file, &index);
            let meta = block(&[(b"rocksdb.index", &handle_bytes(index))], true);
            append(&mut file, &meta);
            footer.extend(EXTENDED_MAGIC);
            footer.extend([0, 0, 0, 0]); // footer checksum, not verified
            footer.extend([7, 0, 0, 0]); // base context checksum
            footer.extend((meta.len() as u32).to_le_bytes());
            footer.resize(41, 0);
        }
        footer.extend(format_version.to_le_bytes());
        footer.extend(MAGIC.to_le_bytes());
        file.extend(footer);
        file
    }

    fn lcg_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn synthetic_tables_read() {
        for format_version in [3, 5, 6, 7] {
            let keys = keys_of(&synthetic(format_version)).unwrap();
            assert_eq!(keys.smallest, b"apple", "format version {format_version}");
            assert_eq!(keys.largest, b"date", "format version {format_version}");
            assert_eq!(keys.entries_hint, None);
        }
    }

    #[test]
    fn short_files_are_refused() {
        assert!(matches!(keys_of(&[]), Err(SstError::TooShort(0))));
        assert!(matches!(keys_of(&[0; 47]), Err(SstError::TooShort(47))));
        let mut legacy_only = vec![0; 52];
        legacy_only[44..].copy_from_slice(&MAGIC.to_le_bytes());
        assert!(matches!(keys_of(&legacy_only), Err(SstError::TooShort(52))));
        assert_eq!(
            keys_of(&[]).unwrap_err().to_string(),
            "too short for an sst file (0 bytes)"
        );
    }

    #[test]
    fn wrong_magic_and_garbage_are_refused() {
        let mut file = synthetic(5);
        let n = file.len();
        file[n - 1] ^= 0x01;
        assert!(matches!(keys_of(&file), Err(SstError::NotBlockBased)));
        assert!(matches!(keys_of(&lcg_bytes(1, 4096)), Err(SstError::NotBlockBased)));
        assert_eq!(
            keys_of(&file).unwrap_err().to_string(),
            "not a rocksdb block-based table"
        );
        file[n - 8..].copy_from_slice(&PLAIN_MAGIC.to_le_bytes());
        assert_eq!(
            keys_of(&file).unwrap_err().to_string(),
            "rocksdb plain tables are not supported"
        );
    }

    #[test]
    fn garbage_behind_a_valid_magic_gives_errors() {
        for seed in 0..300 {
            for format_version in [0u32, 2, 5, 6] {
                let mut file = lcg_bytes(seed, 64 + (seed as usize * 37) % 3000);
                let n = file.len();
                let magic = if format_version == 0 { LEGACY_MAGIC } else { MAGIC };
                file[n - 8..].copy_from_slice(&magic.to_le_bytes());
                if format_version > 0 {
                    file[n - 12..n - 8].copy_from_slice(&format_version.to_le_bytes());
                }
                if format_version == 6 {
                    file[n - 52..n - 48].copy_from_slice(&EXTENDED_MAGIC);
                    file[n - 20..n - 12].fill(0);
                }
                assert!(keys_of(&file).is_err(), "seed {seed}, format version {format_version}");
            }
        }
    }

    #[test]
    fn unknown_format_version_is_named() {
        let mut file = synthetic(5);
        let n = file.len();
        file[n - 12..n - 8].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(keys_of(&file), Err(SstError::FormatVersion(99))));
        assert_eq!(keys_of(&file).unwrap_err().to_string(), "unsupported format version 99");
    }

    #[test]
    fn unsupported_compression_is_named() {
        let mut file = synthetic(5);
        let first_block_len = block(&[(&internal(b"apple"), b"1"), (&internal(b"banana"), b"2")], true).len();
        file[first_block_len] = 3;
        assert!(matches!(keys_of(&file), Err(SstError::Compression(3))));
        assert_eq!(keys_of(&file).unwrap_err().to_string(), "unsupported compression bzip2");
    }

    #[test]
    fn handles_outside_the_file_or_too_large_are_refused() {
        let mut file = synthetic(3);
        let n = file.len();
        let footer = n - FOOTER_LEN;
        let huge = handle_bytes(Handle {
            offset: 0,
            size: 1 << 40,
        });
        let metaindex = parse_footer(&file[footer..], n as u64).unwrap().metaindex;
        let mut part = handle_bytes(metaindex);
        part.extend(&huge);
        part.resize(40, 0);
        file[footer + 1..footer + 41].copy_from_slice(&part);
        assert!(matches!(keys_of(&file), Err(SstError::TooLarge { .. })));
        let mut part = handle_bytes(metaindex);
        part.extend(handle_bytes(Handle {
            offset: u64::MAX - 2,
            size: 10,
        }));
        part.resize(40, 0);
        file[footer + 1..footer + 41].copy_from_slice(&part);
        assert!(matches!(keys_of(&file), Err(SstError::OutOfBounds { .. })));
    }

    #[test]
    fn short_reads_are_errors() {
        let file = synthetic(5);
        let read = |offset: u64, len: usize| Ok(file[offset as usize..offset as usize + len / 2].to_vec());
        assert!(matches!(
            keys_from_bytes(read, file.len() as u64),
            Err(SstError::ShortRead(_))
        ));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        assert!(matches!(
            read_keys(Path::new("/nonexistent/000001.sst")),
            Err(SstError::Io(_))
        ));
    }

    /// Every prefix of a table is an error; every single-byte change is no panic.
    fn assert_robust(file: &[u8]) {
        for len in 0..file.len() {
            assert!(keys_of(&file[..len]).is_err(), "prefix of {len} bytes");
        }
        let mut copy = file.to_vec();
        for i in 0..copy.len() {
            for mask in [0x01, 0x80, 0xff] {
                copy[i] ^= mask;
                let _ = keys_of(&copy);
                copy[i] ^= mask;
            }
        }
    }

    #[test]
    fn synthetic_truncations_and_corruptions_do_not_panic() {
        for format_version in [0, 3, 5, 6] {
            let mut file = synthetic(format_version.max(1));
            if format_version == 0 {
                // Same handles, legacy footer.
                let n = file.len();
                let handles = file[n - 52..n - 12].to_vec();
                file.truncate(n - FOOTER_LEN);
                file.extend(handles);
                file.extend(LEGACY_MAGIC.to_le_bytes());
                assert_eq!(keys_of(&file).unwrap().largest, b"date");
            }
            assert_robust(&file);
        }
    }

    // Real tables, written by RocksDB's ldb and cross-checked with sst_dump.

    /// True if RocksDB's `ldb` and `sst_dump` run. Otherwise says why and returns false,
    /// except under CI=true, where a skip would hide a missing install step.
    fn rocksdb_tools() -> bool {
        let found = ["ldb", "sst_dump"].iter().all(|tool| {
            let probe = Command::new(tool)
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            probe.is_ok()
        });
        if !found && std::env::var("CI").as_deref() == Ok("true") {
            panic!("ldb and sst_dump are needed under CI=true: install rocksdb-tools");
        }
        if !found {
            eprintln!("skipping: ldb or sst_dump not found (install rocksdb-tools)");
        }
        found
    }

    /// How ldb writes a table: compression, overrides of the DB's block-based table
    /// options (patched into its OPTIONS file, which ldb loads), extra ldb flags.
    #[derive(Clone)]
    struct Spec {
        compression: &'static str,
        table: Vec<(&'static str, String)>,
        flags: Vec<String>,
    }

    fn spec(compression: &'static str) -> Spec {
        Spec {
            compression,
            table: Vec::new(),
            flags: Vec::new(),
        }
    }

    impl Spec {
        fn table(mut self, option: &'static str, value: impl ToString) -> Spec {
            self.table.push((option, value.to_string()));
            self
        }

        fn flag(mut self, flag: &str) -> Spec {
            self.flags.push(flag.to_string());
            self
        }
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02X}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn write_sst(dir: &Path, name: &str, spec: &Spec, entries: &[Entry]) -> PathBuf {
        let db = format!("--db={}", dir.join(format!("{name}.db")).display());
        run(Command::new("ldb").args([&db, "--create_if_missing", "put", "k", "v"]));
        if !spec.table.is_empty() {
            patch_options(&dir.join(format!("{name}.db")), &spec.table);
        }
        let input = dir.join(format!("{name}.txt"));
        let text: String = entries
            .iter()
            .map(|(k, v)| format!("0x{} ==> 0x{}\n", hex(k), hex(v)))
            .collect();
        std::fs::write(&input, text).unwrap();
        let sst = dir.join(format!("{name}.sst"));
        let mut cmd = Command::new("ldb");
        cmd.args([&db, "--hex", &format!("--compression_type={}", spec.compression)]);
        cmd.args(&spec.flags).arg("write_extern_sst").arg(&sst);
        run(cmd.stdin(std::fs::File::open(&input).unwrap()));
        sst
    }

    fn patch_options(db: &Path, table: &[(&str, String)]) {
        let names = std::fs::read_dir(db).unwrap().map(|e| e.unwrap().path());
        let latest = names
            .filter(|p| p.to_string_lossy().contains("/OPTIONS-"))
            .max()
            .unwrap();
        let text = std::fs::read_to_string(&latest).unwrap();
        let mut found = vec![false; table.len()];
        let patched: Vec<String> = text
            .lines()
            .map(|line| {
                let option = table
                    .iter()
                    .position(|(k, _)| line.trim_start().starts_with(&format!("{k}=")));
                match option {
                    Some(i) => {
                        found[i] = true;
                        format!("  {}={}", table[i].0, table[i].1)
                    }
                    None => line.to_string(),
                }
            })
            .collect();
        assert!(
            found.iter().all(|&f| f),
            "options not found in {}: {table:?}",
            latest.display()
        );
        std::fs::write(&latest, patched.join("\n") + "\n").unwrap();
    }

    /// First and last user key as `sst_dump` prints them.
    fn sst_dump_range(sst: &Path) -> (Vec<u8>, Vec<u8>) {
        let out = run(Command::new("sst_dump")
            .arg(format!("--file={}", sst.display()))
            .args(["--command=scan", "--output_hex"]));
        let mut keys = out.lines().filter_map(|l| l.strip_prefix('\'')?.split('\'').next());
        let first = keys.next().expect("sst_dump printed no keys");
        let last = keys.next_back().unwrap_or(first);
        (unhex(first), unhex(last))
    }

    fn sst_dump_property(sst: &Path, name: &str) -> String {
        let out = run(Command::new("sst_dump")
            .arg(format!("--file={}", sst.display()))
            .arg("--show_properties"));
        let line = out
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name}"));
        line.trim_start_matches(':').trim().to_string()
    }

    /// Reads the keys of an ldb-written table and checks them against the input and sst_dump.
    fn check(sst: &Path, entries: &[Entry]) -> SstKeys {
        let keys = read_keys(sst).unwrap_or_else(|e| panic!("{}: {e}", sst.display()));
        assert_eq!(keys.smallest, entries[0].0, "{}", sst.display());
        assert_eq!(keys.largest, entries[entries.len() - 1].0, "{}", sst.display());
        assert_eq!((keys.smallest.clone(), keys.largest.clone()), sst_dump_range(sst));
        assert_eq!(keys.entries_hint, Some(entries.len() as u64));
        keys
    }

    fn open(sst: &Path) -> Table<impl Fn(u64, usize) -> io::Result<Vec<u8>>> {
        let bytes = std::fs::read(sst).unwrap();
        let len = bytes.len() as u64;
        let read = move |offset: u64, n: usize| Ok(bytes[offset as usize..offset as usize + n].to_vec());
        Table::open(read, len).unwrap()
    }

    fn assert_many_blocks(sst: &Path) {
        let (first, last, _) = open(sst).locate().unwrap();
        assert_ne!(first, last, "{}: one data block", sst.display());
    }

    /// Whether the first data block carries a hash index (top bit of its last word).
    fn first_data_block_hashed(sst: &Path) -> bool {
        let mut table = open(sst);
        let (first, _, _) = table.locate().unwrap();
        let data = table.block(first, true).unwrap();
        le32(&data[data.len() - 4..]).unwrap() >> 31 == 1
    }

    fn value(i: usize, len: usize) -> Vec<u8> {
        let noise = lcg_bytes(i as u64, len / 2);
        (0..len)
            .map(|j| if j % 2 == 0 { (i % 7) as u8 } else { noise[j / 2] })
            .collect()
    }

    /// `[0x00]`, then `prefix` + a big-endian counter, then `[0xff; 4] + [0x00]`.
    fn entries(n: usize, prefix: &[u8], value_len: usize) -> Vec<Entry> {
        let mut out = vec![(vec![0x00], value(0, value_len))];
        for i in 0..n - 2 {
            out.push(([prefix, &(i as u32).to_be_bytes()].concat(), value(i + 1, value_len)));
        }
        out.push((vec![0xff, 0xff, 0xff, 0xff, 0x00], value(n, value_len)));
        out
    }

    #[test]
    fn compressions_match_sst_dump() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(3000, b"k", 100);
        for compression in ["no", "snappy", "zlib", "lz4", "lz4hc", "zstd"] {
            let sst = write_sst(dir.path(), compression, &spec(compression), &data);
            check(&sst, &data);
            assert_many_blocks(&sst);
        }
    }

    #[test]
    fn format_versions_0_to_5() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(1500, b"fv", 100);
        for format_version in 0..=5u32 {
            for compression in ["no", "snappy", "zlib", "lz4", "zstd"] {
                let mut spec = spec(compression).table("format_version", format_version);
                if format_version == 0 {
                    // Only the legacy checksum keeps RocksDB from writing version 1 instead.
                    spec = spec.table("checksum", "kCRC32c");
                }
                let sst = write_sst(dir.path(), &format!("{compression}-v{format_version}"), &spec, &data);
                assert_eq!(open(&sst).format_version, format_version);
                check(&sst, &data);
                assert_many_blocks(&sst);
            }
        }
    }

    #[test]
    fn twenty_thousand_keys_read_little_of_the_file() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(20_000, b"row-", 100);
        let sst = write_sst(dir.path(), "big", &spec("snappy"), &data);
        check(&sst, &data);
        assert_many_blocks(&sst);
        let bytes = std::fs::read(&sst).unwrap();
        let (reads, read_bytes) = (Cell::new(0), Cell::new(0));
        let read = |offset: u64, n: usize| {
            reads.set(reads.get() + 1);
            read_bytes.set(read_bytes.get() + n);
            Ok(bytes[offset as usize..offset as usize + n].to_vec())
        };
        let keys = keys_from_bytes(read, bytes.len() as u64).unwrap();
        assert_eq!(keys.largest, data[data.len() - 1].0);
        assert!(reads.get() <= 6, "{} reads", reads.get());
        assert!(
            read_bytes.get() * 10 < bytes.len(),
            "read {} of {} bytes",
            read_bytes.get(),
            bytes.len()
        );
    }

    #[test]
    fn long_shared_prefixes() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let prefix: Vec<u8> = (0..200).map(|i| 0x40 + (i % 50) as u8).collect();
        let data = entries(5000, &prefix, 100);
        for (name, spec) in [
            ("default", spec("lz4")),
            ("index-restarts", spec("lz4").table("index_block_restart_interval", 16)),
            (
                "v3-index-restarts",
                spec("zstd")
                    .table("index_block_restart_interval", 16)
                    .table("format_version", 3),
            ),
        ] {
            let sst = write_sst(dir.path(), name, &spec, &data);
            check(&sst, &data);
            assert_many_blocks(&sst);
        }
    }

    #[test]
    fn binary_keys() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0x00], vec![0x00, 0x00], vec![0x00, 0xff], vec![0x7f; 3]];
        keys.extend((0..400u32).map(|i| [&[0x80][..], &i.to_be_bytes(), &[0x00, 0xff]].concat()));
        keys.extend([vec![0xff], vec![0xff, 0x00], vec![0xff; 300]]);
        let data: Vec<Entry> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, value(i, i % 300)))
            .collect();
        for compression in ["no", "zstd"] {
            let sst = write_sst(
                dir.path(),
                compression,
                &spec(compression).table("block_size", 1024),
                &data,
            );
            let keys = check(&sst, &data);
            assert_eq!(
                (keys.smallest.as_slice(), keys.largest.as_slice()),
                (&[][..], &[0xff; 300][..])
            );
            assert_many_blocks(&sst);
        }
    }

    #[test]
    fn index_and_block_layouts() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(8000, b"layout", 100);
        let layouts = [
            (
                "partitioned",
                spec("lz4")
                    .table("index_type", "kTwoLevelIndexSearch")
                    .table("metadata_block_size", 256),
            ),
            (
                "hash-index",
                spec("snappy")
                    .table("index_type", "kHashSearch")
                    .flag("--fix_prefix_len=1"),
            ),
            (
                "first-key",
                spec("zstd").table("index_type", "kBinarySearchWithFirstKey"),
            ),
            (
                "first-key-restarts",
                spec("no")
                    .table("index_type", "kBinarySearchWithFirstKey")
                    .table("index_block_restart_interval", 4),
            ),
            ("index-restarts", spec("zlib").table("index_block_restart_interval", 8)),
            (
                "data-hash",
                spec("lz4").table("data_block_index_type", "kDataBlockBinaryAndHash"),
            ),
            (
                "data-hash-big",
                spec("no")
                    .table("data_block_index_type", "kDataBlockBinaryAndHash")
                    .table("block_size", 262144),
            ),
            ("big-blocks", spec("no").table("block_size", 150_000)),
            ("restart-1", spec("snappy").table("block_restart_interval", 1)),
            ("restart-128", spec("zstd").table("block_restart_interval", 128)),
            ("plain-index", spec("lz4").table("enable_index_compression", false)),
        ];
        for (name, spec) in layouts {
            let sst = write_sst(dir.path(), name, &spec, &data);
            check(&sst, &data);
            assert_many_blocks(&sst);
        }
        assert!(first_data_block_hashed(&dir.path().join("data-hash.sst")));
        assert!(!first_data_block_hashed(&dir.path().join("data-hash-big.sst")));
        let partitions = sst_dump_property(&dir.path().join("partitioned.sst"), "# index partitions");
        assert!(partitions.parse::<u32>().unwrap() > 1, "{partitions} partitions");
    }

    #[test]
    fn partitioned_index_with_one_partition() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(50, b"p", 100);
        let spec = spec("snappy")
            .table("index_type", "kTwoLevelIndexSearch")
            .table("block_size", 512);
        let sst = write_sst(dir.path(), "one-partition", &spec, &data);
        assert_eq!(sst_dump_property(&sst, "# index partitions"), "1");
        check(&sst, &data);
        assert_many_blocks(&sst);
    }

    #[test]
    fn single_entry_table() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = vec![(b"only".to_vec(), b"one".to_vec())];
        let sst = write_sst(dir.path(), "single", &spec("no"), &data);
        let keys = check(&sst, &data);
        assert_eq!(keys.smallest, keys.largest);
    }

    #[test]
    fn dictionary_compression_is_refused() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(3000, b"dict", 100);
        let spec = spec("zstd").flag("--compression_max_dict_bytes=16384");
        let sst = write_sst(dir.path(), "dict", &spec, &data);
        let err = read_keys(&sst).unwrap_err();
        assert!(matches!(err, SstError::Unsupported(_)), "{err}");
        assert_eq!(err.to_string(), "unsupported dictionary compression");
    }

    #[test]
    fn real_table_truncations_and_corruptions_do_not_panic() {
        if !rocksdb_tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = entries(60, b"t", 40);
        for compression in ["zstd", "lz4", "zlib", "snappy"] {
            let spec = spec(compression)
                .table("block_size", 512)
                .table("index_block_restart_interval", 2);
            let sst = write_sst(dir.path(), compression, &spec, &data);
            check(&sst, &data);
            assert_robust(&std::fs::read(&sst).unwrap());
        }
    }
}
