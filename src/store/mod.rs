//! The disk: io_uring reads and writes, block buffers, the files a job sends, the
//! staging a received job waits in, the crash-safe commit, held jobs, free space and
//! the hash cache.

pub mod buf;
pub mod commit;
pub mod disk;
pub mod failpoint;
pub mod hashcache;
pub mod held;
pub mod safefs;
pub mod source;
pub mod space;
pub mod stage;
