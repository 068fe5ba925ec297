//! barge moves immutable storage files (SSTs, sealed data files) between hosts over
//! QUIC with mutual TLS, verifies every 1 MiB block with blake3 as it arrives, and
//! hands each job to the storage engine on the receiving host all at once or not at all.
//!
//! # Tour
//!
//! The protocol core has no I/O; the layers below it drive it over quinn and io_uring.
//!
//! - [`proto`]: the core. [`proto::blocks`] cuts files into blocks whose blake3
//!   chaining values merge into the plain blake3 root (what `b3sum` prints);
//!   [`proto::wire`] encodes the control messages (version 2); [`proto::path`] checks relative
//!   names; [`proto::job`] tracks verified blocks and plans which stream sends what;
//!   [`proto::keys`] names key ranges and places a file's keys against them.
//! - [`certs`]: a private CA and host certificates; a host's identity is its DNS name.
//! - [`tls`]: rustls/quinn configuration with mutual authentication, peer identity.
//! - [`quic`]: transport tuning: connection window from bandwidth x RTT, a fixed stream
//!   window, MTU ceiling, congestion control.
//! - [`congestion`]: BBR bounded by loss (the default controller).
//! - [`credit`]: data streams an agent lets its connections open, shared, so memory
//!   stays bounded however many jobs run.
//! - [`config`]: the agent's TOML configuration, validated in one place.
//! - [`disk`]: reads, writes and syncs on an io_uring thread (O_DIRECT for whole blocks).
//! - [`buf`]: aligned, pooled block buffers.
//! - [`source`]: the files a push or an export sends, and their hashes.
//! - [`hashcache`]: hash once: roots and block values (and SST key spans) cached by
//!   inode, size and mtime.
//! - [`sst`]: the smallest and largest key of a RocksDB SST file, read from the file.
//! - [`safefs`]: opening below a folder held open, never through a symlink.
//! - [`stage`]: the receiving side's staging folder, resume scan, syncs, free space.
//! - [`space`]: free space, counting what admitted jobs have still to write.
//! - [`commit`]: the hand-over of a staged job to its target, crash-safe: an intent
//!   written before the first rename, finished or undone after a crash; outcomes kept
//!   so a job sent again is answered "committed".
//! - [`failpoint`]: places where tests make the process die on purpose.
//! - [`hook`]: import hooks (`move`, `replace`, `exec`, and the [`hook::ImportHook`] trait).
//! - [`held`]: bulk loads: held jobs, the targets they claim, their journal.
//! - [`transfer`]: sender and receiver of one job over a QUIC connection.
//! - [`tcplane`]: the opt-in, unencrypted TCP data lane (`sendfile`), still verified.
//! - [`listen`]: listeners anyone can reach: accept errors backed off, connections
//!   waiting to authenticate bounded in total and per address.
//! - [`agent`]: the sidecar: accepts pushes into imports, serves pulls from exports;
//!   authorizes an identity before it reads what it sends, and counts what each
//!   identity holds so none locks out the others.
//! - [`client`]: push, pull, list, commit and abort from a program or the CLI.
//! - [`zdb`]: 0-db's hook program (offload sealed data files, fetch them back), its
//!   spool for when the backup is away (0-db is never held up), catch-up sync and
//!   namespace clone.
//!
//! # Example
//!
//! An engine that embeds an agent with its own import hook, and a client that pushes
//! a file to it:
//!
//! ```
//! use barge::{agent::{Agent, Hooks}, client::{Client, PushOptions}, config::Config};
//! use barge::hook::{HookError, ImportHook, ImportJob};
//! use std::sync::Arc;
//!
//! struct Engine;
//! impl ImportHook for Engine {
//!     fn import(&self, job: &ImportJob) -> Result<String, HookError> {
//!         // Every file is verified and synced; ingest job.files here.
//!         Ok(format!("ingested {} files", job.files.len()))
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let certs = dir.path().join("certs");
//! barge::certs::init_ca(&certs)?;
//! barge::certs::issue(&certs, "store-b", &[])?;
//! barge::certs::issue(&certs, "operator", &[])?;
//! std::fs::create_dir(dir.path().join("ingest"))?;
//! let config = Config::parse(r#"
//!     listen = "127.0.0.1:0"
//!     [tls]
//!     ca = "certs/ca.pem"
//!     cert = "certs/store-b.pem"
//!     key = "certs/store-b.key"
//!     [[import]]
//!     name = "ingest"
//!     path = "ingest"
//!     allow = ["operator"]
//!     hook = "custom"
//! "#, dir.path())?;
//! let hooks = Hooks::from([("ingest".to_string(), Arc::new(Engine) as Arc<dyn ImportHook>)]);
//! let agent = Agent::start_with_hooks(config, hooks).await?;
//!
//! let file = dir.path().join("000042.sst");
//! std::fs::write(&file, b"an immutable file")?;
//! let client = Client::new(&barge::tls::TlsFiles::in_dir(&certs, "operator"))?;
//! let peer = format!("store-b@{}", agent.local_addr()).parse()?;
//! let report = client.push(&peer, "ingest", &[file], &PushOptions::default()).await?;
//! assert_eq!(report.report, "ingested 1 files");
//! agent.shutdown().await;
//! # Ok(()) }
//! ```

pub mod agent;
pub mod buf;
pub mod certs;
pub mod client;
pub mod commit;
pub mod config;
pub mod congestion;
pub mod credit;
pub mod disk;
pub mod failpoint;
pub mod hashcache;
pub mod held;
pub mod hook;
pub mod listen;
pub mod metrics;
pub mod proto;
pub mod quic;
pub mod ratelimit;
pub mod safefs;
pub mod source;
pub mod space;
pub mod sst;
pub mod stage;
pub mod systemd;
pub mod tcplane;
pub mod tls;
pub mod transfer;
pub mod zdb;
