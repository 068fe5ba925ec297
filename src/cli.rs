//! Command-line arguments. These structs only parse; `commands` turns them into work.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  local error (a file to send is missing, unreadable, changed while sent, ...)
  2  usage error
  3  bad configuration or certificates
  4  could not connect or authenticate to the peer
  5  the peer refused the job (unknown target, not allowed, bad name, exists, no space)
  6  the job failed after it was accepted (bad block, incomplete, import hook failed)";

/// barge moves immutable storage files between hosts over QUIC with mutual TLS,
/// verifies every 1 MiB block with blake3, and hands them to the storage engine
/// atomically on the receiving host.
#[derive(Debug, Parser)]
#[command(name = "barge", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a private CA and host certificates (a host's identity is its certificate's name).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the sidecar agent.
    Agent(AgentArgs),
    /// Send files and folders to an import target of an agent and wait for the commit.
    Push(PushArgs),
    /// Fetch an export of an agent (all of it, or named files) into a folder.
    Pull(PullArgs),
    /// Print each file's blake3 hash, as b3sum does.
    Hash(HashArgs),
    /// Run a complete local transfer between two agents on loopback and show it worked.
    Demo(DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create ca.pem and ca.key (mode 0600) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create NAME.pem and NAME.key signed by the CA in DIR; NAME is the host's identity.
    Issue {
        /// The identity: a DNS name, used in allow lists and to reach the host.
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP address the certificate is valid for (repeatable).
        #[arg(long = "san", value_name = "DNS_OR_IP")]
        sans: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration (TOML). Without it: listen on 127.0.0.1:7878, data under
    /// --data, dev certificates made there on first start.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Folder for the local default (without --config).
    #[arg(long, value_name = "DIR", default_value = "barge-data")]
    pub data: PathBuf,
}

/// The client's own identity.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Folder with ca.pem and IDENTITY.pem/.key [default: barge-data/certs, as made by
    /// `barge agent` without --config]
    #[arg(long, env = "BARGE_CERTS", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// This host's identity (its certificate's name) [default: client]
    #[arg(long, env = "BARGE_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// File that caches the hashes of sent files (by inode, size and mtime), or `off`
    /// [default: $XDG_CACHE_HOME/barge/hashes or ~/.cache/barge/hashes]
    #[arg(long, env = "BARGE_HASH_CACHE", value_name = "FILE")]
    pub hash_cache: Option<String>,
    /// Congestion controller when this side sends: cubic, bbr or newreno
    #[arg(long, env = "BARGE_CONGESTION", value_name = "CC")]
    pub congestion: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Files and folders; each lands under the target with its own name, as `cp -r`.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The agent: HOST:PORT (HOST is the name in its certificate) or NAME@ADDR:PORT.
    #[arg(long, value_name = "PEER")]
    pub to: String,
    /// Import target on the agent.
    #[arg(long, value_name = "TARGET")]
    pub import: String,
    /// Metadata for the import hook, KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Send the data over the unencrypted TCP lane (sendfile) if the target allows it;
    /// control stays on QUIC and every block is still verified. Trusted networks only.
    #[arg(long)]
    pub tcp_lane: bool,
    /// QUIC connections for the data of this push (1-4): more connections let both
    /// ends use more cores on a large job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub connections: u8,
    #[command(flatten)]
    pub id: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The agent: HOST:PORT or NAME@ADDR:PORT.
    pub peer: String,
    /// Export on the agent.
    #[arg(long, value_name = "NAME")]
    pub export: String,
    /// Only this file of the export, by its relative name (repeatable).
    #[arg(long = "file", value_name = "REL")]
    pub files: Vec<String>,
    /// Folder to put the files in (created if missing).
    #[arg(long, value_name = "DIR")]
    pub into: PathBuf,
    #[command(flatten)]
    pub id: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct HashArgs {
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Approximate size of the generated data set, in MiB.
    #[arg(long, default_value_t = 400)]
    pub size_mib: u64,
    /// Keep the temporary folder (certs, data, received files) and print where it is.
    #[arg(long)]
    pub keep: bool,
}
