//! What the storage engines need: import hooks, RocksDB's SST key ranges, and 0-db's
//! hook program, spool and sync.

pub mod hook;
pub mod sst;
pub mod zdb;
