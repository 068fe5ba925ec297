//! The real RocksDB `ldb` tool, for tests whose subject is RocksDB.

use std::process::Command;

/// Key-value pairs, as `ldb` takes and prints them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Whether `ldb` is here; under CI it must be (`.ci/run` installs rocksdb-tools).
pub fn have_ldb() -> bool {
    let found = Command::new("ldb").arg("--help").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "ldb is missing: install rocksdb-tools"
        );
        eprintln!("skipped: ldb (rocksdb-tools) is not installed");
    }
    found
}

/// Upper-case hex, as `ldb --hex` takes keys.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}
