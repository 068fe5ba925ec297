//! barge moves immutable storage files (SSTs, sealed data files) between hosts over
//! QUIC with mutual TLS, verifies every 1 MiB block with blake3 as it arrives, and
//! hands each job to the storage engine on the receiving host all at once or not at all.
//!
//! # Tour
//!
//! The source is grouped by layer. The protocol core has no I/O; the layers around it
//! drive it over quinn and io_uring.
//!
//! - [`proto`]: the core, tested without sockets. [`proto::blocks`] cuts files into
//!   blocks whose blake3 chaining values merge into the plain blake3 root (what `b3sum`
//!   prints); [`proto::wire`] encodes the control messages (version 3: relays and
//!   ships; a frame carries the oldest version that says what it holds);
//!   [`proto::path`] checks relative names; [`proto::job`] tracks verified blocks and
//!   plans which stream sends what; [`proto::session`] is the job protocol's order as a
//!   sender and a receiver state machine; [`proto::keys`] names key ranges.
//! - [`net`]: the network. [`net::certs`] (a private CA, host certificates and their
//!   revocation; a host's identity is its DNS name), [`net::tls`] (mutual
//!   authentication, revocation lists checked on both sides), [`net::quic`] and
//!   [`net::congestion`] (transport tuning, BBR bounded by loss), [`net::credit`] (data
//!   streams shared out so memory stays bounded), [`net::listen`] (listeners anyone can
//!   reach, bounded), [`net::tcplane`] (the TCP data lane: TLS, or clear text where a target says so).
//! - [`store`]: the disk. [`store::disk`] (io_uring, O_DIRECT for whole blocks),
//!   [`store::buf`] (aligned pooled buffers), [`store::source`] (the files a job sends),
//!   [`store::hashcache`] (hash once), [`store::safefs`] (opening below a folder, never
//!   through a symlink), [`store::stage`] (the staging folder, resume scan, syncs),
//!   [`store::space`] (free space counting admitted jobs), [`store::commit`] (the
//!   crash-safe hand-over to the target), [`store::held`] (held jobs and their journal),
//!   [`store::failpoint`] (where tests make the process die on purpose).
//! - [`engines`]: [`engines::hook`] (import hooks: `move`, `replace`, `exec`, the
//!   [`engines::hook::ImportHook`] trait), [`engines::sst`] (a RocksDB SST file's key
//!   range), [`engines::zdb`] (0-db's hook program, spool, sync and clone).
//! - [`transfer`]: the drivers that run [`proto::session`] over QUIC streams and TCP
//!   lanes: the sending and receiving halves of a job, one receive path for every lane,
//!   and [`transfer::relay`], the tap a relay forwards verified blocks from.
//! - [`agent`]: the sidecar: accepts pushes into imports, serves pulls from exports,
//!   relays a job to the replicas after it, ships an export on an operator's order;
//!   authorizes an identity before it reads what it sends, and counts what each
//!   identity holds so none locks out the others.
//! - [`metrics`]: counters for Prometheus, and the per-peer rate limits a job's blocks
//!   are paced by ([`metrics::Meter`], passed to `transfer` by the agent).
//! - [`client`]: push, pull, list, commit and abort from a program or the CLI; push to
//!   several replicas as a relay chain, and order a ship (`client::chain`).
//! - [`config`]: the agent's TOML configuration, validated in one place.
//!
//! The binary's own code (arguments, commands, demo) is in `src/cli/`.
//!
//! # Example
//!
//! An engine that embeds an agent with its own import hook, and a client that pushes
//! a file to it. It runs as a doc test, on loopback with certificates made in a temporary
//! folder; [`client::Client`] shows a push and a pull, [`engines::hook::ImportHook`] a
//! hook that refuses a job before any data moves.
//!
//! ```
//! use barge::{agent::{Agent, Hooks}, client::{Client, PushOptions}, config::Config};
//! use barge::engines::hook::{HookError, ImportHook, ImportJob};
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
//! barge::net::certs::init_ca(&certs)?;
//! barge::net::certs::issue(&certs, "store-b", &[])?;
//! barge::net::certs::issue(&certs, "operator", &[])?;
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
//! let client = Client::new(&barge::net::tls::TlsFiles::in_dir(&certs, "operator"))?;
//! let peer = format!("store-b@{}", agent.local_addr()).parse()?;
//! let report = client.push(&peer, "ingest", &[file], &PushOptions::default()).await?;
//! assert_eq!(report.report, "ingested 1 files");
//! agent.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod agent;
pub mod client;
pub mod config;
pub mod engines;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod store;
pub mod transfer;
