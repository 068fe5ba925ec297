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
  5  the peer refused the job (unknown target, not allowed, bad name, exists, no space,
     busy, target held by another job, region not aligned, no such held job)
  6  the job failed after it was accepted (bad block, incomplete, import hook failed);
     with several replicas (push or ship to a relay chain), any replica failed or refused:
     each is named, the others' results stand";

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
    /// Run the sidecar agent. SIGHUP reloads its config; SIGTERM drains running jobs
    /// (up to `drain_secs`) and exits 0. Under systemd it reports ready, stopping and
    /// watchdog pings, and takes a socket passed by socket activation.
    Agent(AgentArgs),
    /// Send files and folders to an import target of an agent and wait for the commit.
    Push(PushArgs),
    /// Fetch an export of an agent (all of it, named files, or an SST key range) into a folder.
    Pull(PullArgs),
    /// Ask agent SRC_PEER to push files of its export to other agents' import targets,
    /// with its own identity (the data does not pass through here). Needs the export to
    /// name you in its `ship` list, and each target to allow SRC_PEER. Shows progress and
    /// each replica's result; the ship goes on if this command is stopped, and running
    /// it again attaches to it.
    Ship(ShipArgs),
    /// List an export's files with sizes, blake3 hashes and (SST exports) key ranges.
    Ls(LsArgs),
    /// List your jobs being received or held on the agent (and everyone's on the import
    /// targets that name you among their `operators`).
    Jobs(PeerArgs),
    /// Show the agent's jobs in flight with progress, rate and ETA.
    Status(PeerArgs),
    /// Commit a held job (`push --hold`): run the target's import hook, make the files
    /// visible. Only the job's sender, or one of the target's `operators`, may.
    Commit(JobArgs),
    /// Abort a held job: delete everything it staged.
    Abort(JobArgs),
    /// Be 0-db's `--hook`: offload sealed data files, back up index files, fetch missing
    /// data files back (0-db runs `HOOK NAME ID ARGS...`; also reachable as a symlink
    /// named `barge-zdb-hook`).
    ZdbHook(ZdbHookArgs),
    /// Clone a whole namespace of a frozen 0-db to the backup agent's data and index targets.
    ZdbClone(ZdbCloneArgs),
    /// Catch the backup up: send what the zdb hook spooled, every sealed data file the
    /// backup lacks, and every index file and zdb-namespace as they are now. Idempotent;
    /// run it from a timer (systemd/barge-zdb-sync.timer).
    ZdbSync(ZdbSyncArgs),
    /// Print each file's blake3 hash, as b3sum does.
    Hash(HashArgs),
    /// Run a complete local transfer between two agents on loopback and show it worked.
    Demo(DemoArgs),
    /// Write the man pages (barge(1) and one per subcommand) and the bash, zsh and fish
    /// completions under DIR, for packaging: DIR/man/*.1 and DIR/completions/.
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create ca.pem and ca.key (mode 0600) in DIR.
    Init {
        /// Folder for the CA's files (made if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create NAME.pem and NAME.key signed by the CA in DIR; NAME is the host's identity.
    Issue {
        /// The identity: a DNS name, used in allow lists and to reach the host.
        name: String,
        /// Folder with the CA (ca.pem, ca.key); the new files are written there.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP address the certificate is valid for (repeatable).
        #[arg(long = "san", value_name = "DNS_OR_IP")]
        sans: Vec<String>,
        /// Days the certificate is valid for.
        #[arg(long, value_name = "N", default_value_t = barge::net::certs::VALID_DAYS)]
        days: u32,
        /// Replace NAME's existing certificate and key (rotation); the new files are
        /// renamed over the old ones. Then reload the agent that uses them (SIGHUP).
        #[arg(long)]
        replace: bool,
    },
    /// Revoke NAME's certificate: add it to the CA's revocation list DIR/ca.crl.pem
    /// (made if missing). Agents with it in `[tls] crl`, once reloaded, and clients
    /// using DIR then refuse that certificate.
    Revoke {
        /// The identity whose certificate (DIR/NAME.pem) is revoked.
        name: String,
        /// Folder with the CA (ca.pem, ca.key) and NAME.pem.
        #[arg(long)]
        dir: PathBuf,
        /// Days until the list's next update (its validity as a current list).
        #[arg(long, value_name = "N", default_value_t = barge::net::certs::CRL_DAYS)]
        days: u32,
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
    /// Log format on stderr: `text`, or `json` (one object per line, with span fields).
    #[arg(long, env = "BARGE_LOG_FORMAT", value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The client's own identity.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Folder with ca.pem and IDENTITY.pem/.key, and ca.crl.pem if certificates were
    /// revoked [default: barge-data/certs, as made by `barge agent` without --config]
    #[arg(long, env = "BARGE_CERTS", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// This host's identity (its certificate's name) [default: client]
    #[arg(long, env = "BARGE_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// File that caches the hashes of sent files (by inode, size and mtime), or `off`
    /// [default: $XDG_CACHE_HOME/barge/hashes or ~/.cache/barge/hashes]
    #[arg(long, env = "BARGE_HASH_CACHE", value_name = "FILE")]
    pub hash_cache: Option<String>,
    /// Congestion controller when this side sends: bbr-bounded (BBR that backs off on
    /// heavy loss), bbr, cubic or newreno [default: bbr-bounded]
    #[arg(long, env = "BARGE_CONGESTION", value_name = "CC")]
    pub congestion: Option<String>,
    /// Largest UDP payload path-MTU discovery may try when this side sends: 1452 suits
    /// any Ethernet path; 8952 for jumbo frames [default: 1452]
    #[arg(long, env = "BARGE_MAX_MTU", value_name = "BYTES")]
    pub max_mtu: Option<String>,
    /// Seconds a new connection may take to answer before the command fails (exit 4)
    /// [default: 5]
    #[arg(long, env = "BARGE_CONNECT_TIMEOUT", value_name = "SECS")]
    pub connect_timeout: Option<String>,
    /// Seconds of silence after which the peer counts as dead; keep-alives go out four
    /// times as often [default: 10]
    #[arg(long, env = "BARGE_IDLE_TIMEOUT", value_name = "SECS")]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Files and folders; each lands under the target with its own name, as `cp -r`.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The agent: HOST:PORT (HOST is the name in its certificate) or NAME@ADDR:PORT.
    /// Given several times, a relay chain in this order: the first replica forwards
    /// each block to the second as it verifies it, and so on, so this side sends each
    /// byte once. Put hosts that share a rack next to each other.
    #[arg(long, value_name = "PEER", required = true)]
    pub to: Vec<String>,
    /// Import target on the agent(s); with several replicas, either one TARGET for
    /// all, or NAME=TARGET for each (NAME: the replica's certificate name).
    #[arg(long, value_name = "TARGET", required = true)]
    pub import: Vec<String>,
    /// Metadata for the import hook, KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Send the data over the TCP lane if the target allows it to this identity: TLS 1.3
    /// with the same certificates (or clear text with sendfile, where the target says
    /// `tcp_lane = "cleartext"`); control stays on QUIC and every block is verified.
    /// `--json` names the lane used ("quic", "tls", "cleartext").
    #[arg(long)]
    pub tcp_lane: bool,
    /// QUIC connections for the data of this push (1-4): more connections let both
    /// ends use more cores on a large job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub connections: u8,
    /// Bulk load: stage and verify everything, then hold the job (and the target) until
    /// `barge commit` or `barge abort`; prints the job id.
    #[arg(long)]
    pub hold: bool,
    /// Send only the RocksDB SST files (*.sst) among PATHS, each with its key range.
    #[arg(long)]
    pub sst: bool,
    /// Send only the SST files whose keys lie in [START, END) (implies --sst); keys are
    /// UTF-8 or 0x-hex, either end may be left open. A file across a boundary fails.
    #[arg(long, value_name = "START..END")]
    pub range: Option<String>,
    /// Print one JSON object (job id, files, bytes, seconds, hashes) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub id: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct ShipArgs {
    /// The agent that sends: HOST:PORT or NAME@ADDR:PORT.
    #[arg(value_name = "SRC_PEER")]
    pub peer: String,
    /// Export on that agent.
    #[arg(long, value_name = "NAME")]
    pub export: String,
    /// Only this file of the export, by its relative name (repeatable).
    #[arg(long = "file", value_name = "REL", conflicts_with = "range")]
    pub files: Vec<String>,
    /// SST export only: the files whose keys lie in [START, END).
    #[arg(long, value_name = "START..END")]
    pub range: Option<String>,
    /// The receiving agent(s), as for `push --to`; several make a relay chain in
    /// this order (SRC_PEER sends each byte once).
    #[arg(long, value_name = "PEER", required = true)]
    pub to: Vec<String>,
    /// Import target(s), as for `push --import`.
    #[arg(long, value_name = "TARGET", required = true)]
    pub import: Vec<String>,
    /// Stage, verify and hold on every replica until `barge commit` or `barge abort`.
    #[arg(long)]
    pub hold: bool,
    /// Print one JSON object (job, files, bytes, seconds, replicas) instead of text.
    #[arg(long)]
    pub json: bool,
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
    #[arg(long = "file", value_name = "REL", conflicts_with = "range")]
    pub files: Vec<String>,
    /// SST export only: the files whose keys lie in [START, END); keys are UTF-8 or
    /// 0x-hex. A file with keys across a boundary fails the pull (region not aligned).
    #[arg(long, value_name = "START..END")]
    pub range: Option<String>,
    /// Folder to put the files in (created if missing).
    #[arg(long, value_name = "DIR")]
    pub into: PathBuf,
    /// What to do with a name DIR already has: `refuse` the pull, `skip-identical` (a
    /// file with the same blake3 hash is kept and none of its bytes are sent, so running
    /// the pull again moves no data; other content is refused), or `replace` it.
    #[arg(long, value_name = "WHAT", default_value = "refuse", value_parser = parse_on_exists)]
    pub on_exists: barge::config::OnExists,
    /// Take the data over the TCP lane with TLS, if the export offers it to this
    /// identity (`tcp_lane` on the export): this command listens on a TCP port of its
    /// own and the agent connects to it. Otherwise the data comes over QUIC.
    #[arg(long)]
    pub tcp_lane: bool,
    /// Print one JSON object (job id, files, bytes, seconds, hashes) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub id: IdentityArgs,
}

fn parse_on_exists(s: &str) -> Result<barge::config::OnExists, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// The agent: HOST:PORT or NAME@ADDR:PORT.
    pub peer: String,
    /// Export on the agent.
    #[arg(long, value_name = "NAME")]
    pub export: String,
    /// SST export only: list the files whose keys lie in [START, END).
    #[arg(long, value_name = "START..END")]
    pub range: Option<String>,
    /// Print JSON (one object per file) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub id: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// The agent: HOST:PORT or NAME@ADDR:PORT.
    pub peer: String,
    #[command(flatten)]
    pub id: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The agent(s), HOST:PORT or NAME@ADDR:PORT, then the job id `push --hold`
    /// printed (32 hex digits). With several agents (the replicas of a held relay
    /// push), each is done in turn and reported; the command fails if any did.
    #[arg(required = true, num_args = 2.., value_name = "PEER... JOB")]
    pub args: Vec<String>,
    #[command(flatten)]
    pub id: IdentityArgs,
}

const ZDB_CONFIG_HELP: &str = "\
The zdb config (TOML) names 0-db's folders and the backup agent:
  data_dir = \"/var/lib/zdb/data\"      # 0-db --data
  index_dir = \"/var/lib/zdb/index\"    # 0-db --index
  peer = \"backup@10.0.0.2:7878\"
  data_target = \"zdb-data\"    # import on the peer for sealed data files (hook = \"move\")
  index_target = \"zdb-index\"  # import for index files (hook = \"replace\")
  data_export = \"zdb-data\"    # export on the peer over the data target's folder
  connect_timeout_secs = 3     # 1-60: a silent backup is given up after this long, the
                               # hook's work spooled (0-db waits for jump hooks meanwhile)
  spool_dir = \"/var/lib/zdb/barge-zdb-spool\"  # default: barge-zdb-spool next to index_dir;
                               # never inside data_dir or index_dir
  [tls]
  ca = \"certs/ca.pem\"
  cert = \"certs/store-a.pem\"
  key = \"certs/store-a.key\"";

#[derive(Debug, Args)]
#[command(after_help = ZDB_CONFIG_HELP)]
pub struct ZdbHookArgs {
    /// The zdb config file.
    #[arg(
        long,
        env = "BARGE_ZDB_CONFIG",
        value_name = "FILE",
        default_value = "/etc/barge/zdb.toml"
    )]
    pub config: PathBuf,
    /// What 0-db passes: the hook name (jump-data, jump-index, missing-data, ready, ...),
    /// its instance id, then the hook's arguments.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true, trailing_var_arg = true, value_name = "HOOK ID ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = ZDB_CONFIG_HELP)]
pub struct ZdbCloneArgs {
    /// The zdb config file.
    #[arg(
        long,
        env = "BARGE_ZDB_CONFIG",
        value_name = "FILE",
        default_value = "/etc/barge/zdb.toml"
    )]
    pub config: PathBuf,
    /// The namespace to clone (its folder name under data_dir and index_dir).
    #[arg(long, value_name = "NS")]
    pub namespace: String,
}

#[derive(Debug, Args)]
#[command(after_help = ZDB_CONFIG_HELP)]
pub struct ZdbSyncArgs {
    /// The zdb config file.
    #[arg(
        long,
        env = "BARGE_ZDB_CONFIG",
        value_name = "FILE",
        default_value = "/etc/barge/zdb.toml"
    )]
    pub config: PathBuf,
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
