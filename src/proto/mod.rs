//! The protocol core: block verification, message encoding, names and the per-job
//! state machines. Nothing here touches a socket or a disk, so all of it is tested
//! with plain bytes; the `transfer` module drives it over quinn and io_uring.

pub mod blocks;
pub mod job;
pub mod keys;
pub mod path;
pub mod session;
pub mod wire;

/// Every limit the protocol enforces, in one place.
pub mod limits {
    /// Largest control message body, in bytes.
    pub const MAX_MESSAGE: u64 = 64 << 20;
    /// Most files in one job.
    pub const MAX_FILES: usize = 100_000;
    /// Longest relative file name, in bytes.
    pub const MAX_PATH_LEN: usize = 4096;
    /// Longest single name component, in bytes.
    pub const MAX_COMPONENT_LEN: usize = 255;
    /// Most components in one name.
    pub const MAX_DEPTH: usize = 64;
    /// Largest file: 1 TiB (its block list is then 32 MiB).
    pub const MAX_FILE_SIZE: u64 = 1 << 40;
    /// Longest target or export name, and metadata key.
    pub const MAX_NAME_LEN: usize = 255;
    /// Most metadata entries in an offer.
    pub const MAX_META: usize = 64;
    /// Longest metadata value.
    pub const MAX_META_VALUE: usize = 4096;
    /// Longest reason or report text.
    pub const MAX_REASON_LEN: usize = 16 << 10;
    /// Longest user key in a key range or span (RocksDB keys are usually far shorter).
    pub const MAX_KEY_LEN: usize = 64 << 10;
    /// Most jobs in one `Jobs` listing.
    pub const MAX_LISTED_JOBS: usize = 10_000;
    /// Data streams a sender opens per job at most.
    pub const MAX_STREAMS: usize = 8;
    /// Most replicas after the first in a relay chain.
    pub const MAX_HOPS: usize = 16;
    /// Longest peer (`NAME@ADDR:PORT`) in a relay chain.
    pub const MAX_PEER_LEN: usize = 512;
}
