//! Fleets: files a replica already holds are not sent again, pulls run again move no
//! data, third-party ships, and one upload relayed to many replicas (real agents over
//! loopback QUIC, certificates from barge's own certs code).

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::config::OnExists;
use common::*;

const SKIPPING: &str =
    "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\non_exists = \"skip-identical\"\n\
[[export]]\nname = \"out\"\npath = \"outbox\"\nallow = [\"client\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_target_holds_with_the_same_content_is_not_sent() {
    let env = env_with(SKIPPING, "", Hooks::new()).await;
    let client = env.client("client");
    let (a, b) = (env.src().join("a"), env.src().join("b"));
    write(&a, &content(1, 3 << 20));
    write(&b, &content(2, 2 << 20));
    // Each push a job of its own (the same job sent again is confirmed from the record).
    let n = std::sync::atomic::AtomicU32::new(0);
    let push = |files: Vec<std::path::PathBuf>| {
        let (client, peer) = (&client, env.peer());
        let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let opts = PushOptions {
            meta: vec![("try".into(), k.to_string())],
            ..Default::default()
        };
        async move { client.push(&peer, "in", &files, &opts).await }
    };
    push(vec![a.clone()]).await.unwrap();
    let r = push(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(r.blocks_sent, 2, "only b's two blocks travel");
    assert_eq!(r.bytes_sent, 2 << 20);
    assert_eq!(r.blocks_held, 3);
    assert!(
        r.report.contains("1 already there with the same content"),
        "{}",
        r.report
    );
    assert_same_tree(&env.src(), &env.inbox());
    // Sent again whole: nothing travels, and the commit says so.
    let r = push(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!((r.blocks_sent, r.bytes_sent), (0, 0));
    assert!(r.report.contains("all 2 files already in in"), "{}", r.report);
    // Other content under a name the target has is still refused, before any data.
    write(&b, &content(3, 2 << 20));
    let err = push(vec![b.clone()]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("b already exists in the target with other content"),
        "{err}"
    );
    assert!(emptied(&env.staging("in")), "nothing left staged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_stages_even_the_files_the_target_holds() {
    let env = env_with(SKIPPING, "", Hooks::new()).await;
    let client = env.client("client");
    let a = env.src().join("a");
    write(&a, &content(1, 2 << 20));
    let peer = env.peer();
    client
        .push(&peer, "in", std::slice::from_ref(&a), &PushOptions::default())
        .await
        .unwrap();
    let held = PushOptions {
        hold: true,
        meta: vec![("held".into(), "yes".into())],
        ..Default::default()
    };
    let r = client.push(&peer, "in", std::slice::from_ref(&a), &held).await.unwrap();
    assert!(r.held);
    assert_eq!(r.blocks_sent, 2, "a held job's commit may come when the target changed");
    let report = client.commit(&peer, r.job).await.unwrap();
    assert!(report.contains("already in in"), "{report}");
    assert_eq!(std::fs::read(env.inbox().join("a")).unwrap(), content(1, 2 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_run_again_with_skip_identical_moves_no_data() {
    let env = env().await;
    write(&env.outbox().join("x/one"), &content(4, 3 << 20));
    write(&env.outbox().join("two"), &content(5, 1000));
    let client = env.client("client");
    let into = env.root().join("pulled");
    let pull = |on: OnExists| {
        let (client, peer, into) = (&client, env.peer(), into.clone());
        async move {
            client
                .pull_into(
                    &peer,
                    "out",
                    (&[], None),
                    &into,
                    barge::client::PullOptions {
                        on_exists: on,
                        tcp_lane: false,
                    },
                )
                .await
        }
    };
    let first = pull(OnExists::SkipIdentical).await.unwrap();
    assert_eq!((first.blocks_received, first.files_there), (4, 0));
    assert_same_tree(&env.outbox(), &into);
    let again = pull(OnExists::SkipIdentical).await.unwrap();
    assert_eq!(
        (again.blocks_received, again.files_there),
        (0, 2),
        "no data the second time"
    );
    assert_same_tree(&env.outbox(), &into);
    // The default refuses names the folder has, naming one.
    let err = pull(OnExists::Refuse).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // A changed source file: skip-identical refuses it, replace takes it.
    write(&env.outbox().join("two"), &content(6, 1000));
    let err = pull(OnExists::SkipIdentical).await.unwrap_err();
    assert!(err.to_string().contains("two already exists"), "{err}");
    let r = pull(OnExists::Replace).await.unwrap();
    assert_eq!(r.files, 2);
    assert_same_tree(&env.outbox(), &into);
}

/// Agents named `names`, each with import target `in` (every name and `client`
/// allowed; `relay_from` as given; `on_exists`) and export `out`, on loopback.
struct Fleet {
    dir: tempfile::TempDir,
    agents: Vec<Option<barge::agent::Agent>>,
    names: Vec<String>,
    /// Who each agent's import target `in` allows (default: every agent and `client`).
    allow: fn(&str) -> Option<&'static str>,
    /// Agent-wide settings of each agent (before its tables).
    settings: fn(&str) -> &'static str,
    /// More settings of each agent's export `out`.
    export_extra: &'static str,
}

impl Fleet {
    async fn start(names: &[&str], target_extra: &str) -> Fleet {
        Fleet::start_with(names, target_extra, |_| None).await
    }

    async fn start_with(names: &[&str], target_extra: &str, allow: fn(&str) -> Option<&'static str>) -> Fleet {
        Fleet::start_full(names, target_extra, allow, |_| "").await
    }

    async fn start_full(
        names: &[&str],
        target_extra: &str,
        allow: fn(&str) -> Option<&'static str>,
        settings: fn(&str) -> &'static str,
    ) -> Fleet {
        Fleet::start_exporting(names, target_extra, allow, settings, "").await
    }

    async fn start_exporting(
        names: &[&str],
        target_extra: &str,
        allow: fn(&str) -> Option<&'static str>,
        settings: fn(&str) -> &'static str,
        export_extra: &'static str,
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        barge::net::certs::init_ca(&certs).unwrap();
        for name in names.iter().chain(&["client", "operator", "stranger"]) {
            barge::net::certs::issue(&certs, name, &[]).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        let mut fleet = Fleet {
            dir,
            agents: vec![],
            names: names.iter().map(|n| n.to_string()).collect(),
            allow,
            settings,
            export_extra,
        };
        for i in 0..names.len() {
            let agent = fleet.start_one(i, target_extra).await;
            fleet.agents.push(Some(agent));
        }
        fleet
    }

    fn config_path(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.toml", self.names[i]))
    }

    async fn start_one(&self, i: usize, target_extra: &str) -> barge::agent::Agent {
        let name = &self.names[i];
        let root = self.dir.path().join(name);
        for d in ["in", "out"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let allow: Vec<String> = self
            .names
            .iter()
            .chain(&["client".to_string()])
            .map(|n| format!("{n:?}"))
            .collect();
        let all = allow.join(", ");
        let allow = (self.allow)(name).map(str::to_string).unwrap_or_else(|| all.clone());
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{name}/data\"\n{}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n\
             [[import]]\nname = \"in\"\npath = \"{name}/in\"\nallow = [{allow}]\nrelay_from = [{all}]\noperators = [\"client\"]\n{target_extra}\n\
             [[export]]\nname = \"out\"\npath = \"{name}/out\"\nallow = [{all}]\nship = [\"operator\"]\n{}\n",
            (self.settings)(name),
            self.export_extra,
        );
        std::fs::write(self.config_path(i), text).unwrap();
        let config = barge::config::Config::load(&self.config_path(i)).unwrap();
        barge::agent::Agent::start(config).await.unwrap()
    }

    fn peer(&self, i: usize) -> barge::client::Peer {
        let addr = self.agents[i].as_ref().unwrap().local_addr();
        format!("{}@{addr}", self.names[i]).parse().unwrap()
    }

    fn replica(&self, i: usize) -> barge::client::Replica {
        barge::client::Replica {
            peer: self.peer(i),
            target: "in".into(),
        }
    }

    fn inbox(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(&self.names[i]).join("in")
    }

    fn src(&self) -> std::path::PathBuf {
        self.dir.path().join("src")
    }

    /// `client` pushes `set` to every agent of the fleet, as a chain in their order.
    async fn push_all(&self, set: &std::path::Path, opts: &PushOptions) -> barge::client::ChainReport {
        let chain: Vec<_> = (0..self.names.len()).map(|i| self.replica(i)).collect();
        let client = self.client("client");
        client.push_chain(&chain, &[set.to_path_buf()], opts).await.unwrap()
    }

    fn client(&self, identity: &str) -> barge::client::Client {
        barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(
            &self.dir.path().join("certs"),
            identity,
        ))
        .unwrap()
    }
}

/// Writes `n` files of `len` bytes under the fleet's `src/set`.
fn data_set(fleet: &Fleet, n: u64, len: usize) -> std::path::PathBuf {
    let set = fleet.src().join("set");
    for i in 0..n {
        write(&set.join(format!("f{i}")), &content(100 + i, len));
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_replicas_gets_every_block_from_the_sender_once() {
    let fleet = Fleet::start(&["b", "c", "d"], "").await;
    let set = data_set(&fleet, 4, (3 << 20) + 12345);
    let r = fleet.push_all(&set, &PushOptions::default()).await;
    let payload = 4 * ((3 << 20) + 12345) as u64;
    assert_eq!(r.bytes_sent, payload, "the sender sends each byte once");
    assert_eq!(r.replicas.len(), 3);
    for (i, rep) in r.replicas.iter().enumerate() {
        assert_eq!(rep.peer, fleet.peer(i).to_string());
        assert_eq!(rep.outcome, barge::proto::wire::ReplicaOutcome::Committed, "{rep:?}");
        assert_eq!(rep.bytes, payload, "each hop got every byte once: {rep:?}");
        assert_same_tree(&fleet.src(), &fleet.inbox(i));
    }
}

fn ship_to(fleet: &Fleet, export: &str, to: &[usize], hold: bool) -> barge::proto::wire::Ship {
    barge::proto::wire::Ship {
        export: export.into(),
        files: vec![],
        range: None,
        to: to
            .iter()
            .map(|i| barge::proto::wire::Hop {
                peer: fleet.peer(*i).to_string(),
                target: "in".into(),
            })
            .collect(),
        hold,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ship_sends_an_export_from_one_agent_to_another_and_names_every_refusal() {
    // b takes pushes from everyone but a.
    let fleet = Fleet::start_with(&["a", "b", "c"], "", |n| (n == "b").then_some("\"c\", \"client\"")).await;
    let out = fleet.dir.path().join("a/out");
    write(&out.join("x/one"), &content(7, (2 << 20) + 5));
    write(&out.join("two"), &content(8, 777));
    let operator = fleet.client("operator");
    let r = operator
        .ship(&fleet.peer(0), ship_to(&fleet, "out", &[2], false))
        .await
        .unwrap();
    assert_eq!(r.replicas.len(), 1);
    assert_eq!(
        r.replicas[0].outcome,
        barge::proto::wire::ReplicaOutcome::Committed,
        "{r:?}"
    );
    assert_same_tree(&out, &fleet.inbox(2));
    assert!(
        operator.tally().done.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "progress was shown"
    );

    // An identity missing from the export's ship list is refused, by name.
    let err = fleet
        .client("client")
        .ship(&fleet.peer(0), ship_to(&fleet, "out", &[2], false))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("client may not order ships from export \"out\""),
        "{text}"
    );
    assert!(
        matches!(err, barge::transfer::TransferError::Rejected(ref r) if r.code == barge::proto::wire::code::NOT_ALLOWED)
    );

    // b does not allow a: the replica's line names b, and that a was refused.
    let r = operator
        .ship(&fleet.peer(0), ship_to(&fleet, "out", &[1], false))
        .await
        .unwrap();
    let line = &r.replicas[0];
    assert_eq!(line.outcome, barge::proto::wire::ReplicaOutcome::Failed);
    assert!(line.peer.starts_with("b@"), "{line:?}");
    assert!(
        line.text.contains("a may not write to import target \"in\""),
        "{line:?}"
    );
    assert!(list(&fleet.inbox(1)).is_empty(), "nothing reached b");
}

/// How many TCP lanes of `kind` agent `i` granted, from its metrics.
fn lanes_granted(fleet: &Fleet, i: usize, kind: &str) -> u64 {
    let text = fleet.agents[i].as_ref().unwrap().metrics();
    let line = format!("barge_tcp_lane_grants_total{{kind=\"{kind}\"}} ");
    let n = text.lines().find_map(|l| l.strip_prefix(line.as_str()));
    n.map(|n| n.trim().parse().unwrap()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ship_goes_over_the_tls_lane_where_export_and_replica_allow_it() {
    // a's export sends on the TLS lane to c only; b and c take the lane.
    let export = "tcp_lane = true\ntcp_lane_peers = [\"c\"]";
    let fleet = Fleet::start_exporting(&["a", "b", "c"], "tcp_lane = true", |_| None, |_| "", export).await;
    let out = fleet.dir.path().join("a/out");
    write(&out.join("x/one"), &content(9, (3 << 20) + 17));
    write(&out.join("two"), &content(10, 4321));
    let operator = fleet.client("operator");
    let ship_to_replica = |i: usize| {
        let (operator, fleet, out) = (&operator, &fleet, &out);
        async move {
            let r = operator.ship(&fleet.peer(0), ship_to(fleet, "out", &[i], false)).await;
            let r = r.unwrap();
            let committed = barge::proto::wire::ReplicaOutcome::Committed;
            assert_eq!(r.replicas[0].outcome, committed, "{r:?}");
            assert_same_tree(out, &fleet.inbox(i));
        }
    };
    ship_to_replica(2).await;
    assert_eq!(
        lanes_granted(&fleet, 2, "tls"),
        1,
        "c received the ship over the TLS lane"
    );
    // b is not on the export's lane list: its copy travels over QUIC.
    ship_to_replica(1).await;
    assert_eq!(lanes_granted(&fleet, 1, "tls"), 0, "b received over QUIC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_chain_commits_or_aborts_on_every_replica() {
    let fleet = Fleet::start(&["b", "c", "d"], "").await;
    let set = data_set(&fleet, 3, (1 << 20) + 99);
    let client = fleet.client("client");
    let chain: Vec<_> = (0..3).map(|i| fleet.replica(i)).collect();
    let held = |tag: &str| PushOptions {
        hold: true,
        meta: vec![("load".into(), tag.into())],
        ..Default::default()
    };
    let r = client
        .push_chain(&chain, std::slice::from_ref(&set), &held("one"))
        .await
        .unwrap();
    for (i, rep) in r.replicas.iter().enumerate() {
        assert_eq!(rep.outcome, barge::proto::wire::ReplicaOutcome::Held, "{rep:?}");
        assert!(list(&fleet.inbox(i)).is_empty(), "nothing visible while held");
    }
    let job = r.first.job;
    assert!(
        r.replicas.iter().all(|x| x.job == job),
        "one job id on every replica (same target)"
    );
    for i in 0..3 {
        client.commit(&fleet.peer(i), job).await.unwrap();
        assert_same_tree(&fleet.src(), &fleet.inbox(i));
    }
    // Another load, held everywhere, then aborted everywhere: nothing stays.
    let more = fleet.src().join("more");
    write(&more.join("extra"), &content(9, (1 << 20) + 4096));
    let r = client.push_chain(&chain, &[more], &held("two")).await.unwrap();
    assert!(r.all_delivered(), "{:?}", r.replicas);
    for i in 0..3 {
        client.abort(&fleet.peer(i), r.first.job).await.unwrap();
        assert!(!fleet.inbox(i).join("more").exists());
        let staging = barge::config::Config::load(&fleet.config_path(i))
            .unwrap()
            .import("in")
            .unwrap()
            .staging
            .clone();
        assert!(emptied(&staging), "replica {i}: nothing left staged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_holds_half_the_files_gets_only_the_other_half() {
    let fleet = Fleet::start(&["b", "c", "d"], "on_exists = \"skip-identical\"").await;
    let set = data_set(&fleet, 4, 2 << 20);
    // c already has f0 and f1, the same content.
    for f in ["f0", "f1"] {
        let to = fleet.inbox(1).join("set").join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(set.join(f), to).unwrap();
    }
    let r = fleet.push_all(&set, &PushOptions::default()).await;
    let whole = 4 * (2 << 20) as u64;
    let got: Vec<u64> = r.replicas.iter().map(|x| x.bytes).collect();
    assert_eq!(
        got,
        [whole, whole / 2, whole],
        "c got only f2 and f3; d, after it, everything"
    );
    assert_eq!(r.bytes_sent, whole, "the sender still sends each byte once");
    for i in 0..3 {
        assert_same_tree(&fleet.src(), &fleet.inbox(i));
    }
    assert!(r.replicas[1].text.contains("2 already there"), "{:?}", r.replicas[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_is_skipped_and_named() {
    // c allows nobody but client: b's forward to it is refused, so b sends to d itself.
    let fleet = Fleet::start_with(&["b", "c", "d"], "", |n| (n == "c").then_some("\"client\"")).await;
    let set = data_set(&fleet, 2, 1 << 20);
    let r = fleet.push_all(&set, &PushOptions::default()).await;
    use barge::proto::wire::ReplicaOutcome::*;
    let outcomes: Vec<_> = r.replicas.iter().map(|x| x.outcome).collect();
    assert_eq!(outcomes, [Committed, Failed, Committed], "{:?}", r.replicas);
    assert!(r.replicas[1].text.contains("b may not write"), "{:?}", r.replicas[1]);
    assert_eq!(r.bytes_sent, 2 << 20, "the sender still sent once");
    assert_same_tree(&fleet.src(), &fleet.inbox(0));
    assert_same_tree(&fleet.src(), &fleet.inbox(2));
    assert!(list(&fleet.inbox(1)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_relays_only_for_the_senders_it_names() {
    let fleet = Fleet::start(&["b", "c"], "").await;
    // `stranger` may write to b? No: not on the allow list, so make b's relay the
    // question: client is allowed and in relay_from; an offer that names hops from a
    // sender missing from relay_from is refused by name, before any data.
    let text = std::fs::read_to_string(fleet.config_path(0)).unwrap();
    let text = text.replacen("relay_from = [\"b\", \"c\", \"client\"]", "relay_from = [\"c\"]", 1);
    assert!(text.contains("relay_from = [\"c\"]"), "{text}");
    std::fs::write(fleet.config_path(0), text).unwrap();
    let agent = fleet.agents[0].as_ref().unwrap();
    agent
        .reload(barge::config::Config::load(&fleet.config_path(0)).unwrap())
        .unwrap();
    let set = data_set(&fleet, 1, 1000);
    let client = fleet.client("client");
    let chain: Vec<_> = (0..2).map(|i| fleet.replica(i)).collect();
    let r = client
        .push_chain(&chain, std::slice::from_ref(&set), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(r.replicas[0].outcome, barge::proto::wire::ReplicaOutcome::Failed);
    assert!(
        r.replicas[0].text.contains("does not relay for client"),
        "{:?}",
        r.replicas[0]
    );
    // The sender then sends to c itself.
    assert_eq!(r.replicas[1].outcome, barge::proto::wire::ReplicaOutcome::Committed);
    assert_same_tree(&fleet.src(), &fleet.inbox(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_a_next_replica_whose_certificate_is_revoked() {
    let fleet = Fleet::start(&["b", "c"], "").await;
    let certs = fleet.dir.path().join("certs");
    barge::net::certs::revoke(&certs, "c", 30).unwrap();
    // b checks the agents it sends to against the CA's list once it has it.
    let text = std::fs::read_to_string(fleet.config_path(0)).unwrap();
    let text = text.replacen(
        "key = \"certs/b.key\"\n",
        "key = \"certs/b.key\"\ncrl = [\"certs/ca.crl.pem\"]\n",
        1,
    );
    assert!(text.contains("crl = "), "{text}");
    std::fs::write(fleet.config_path(0), text).unwrap();
    let b = fleet.agents[0].as_ref().unwrap();
    b.reload(barge::config::Config::load(&fleet.config_path(0)).unwrap())
        .unwrap();
    let set = data_set(&fleet, 1, 1000);
    let chain: Vec<_> = (0..2).map(|i| fleet.replica(i)).collect();
    let client = fleet.client("client");
    let r = client
        .push_chain(&chain, std::slice::from_ref(&set), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(r.replicas[0].outcome, barge::proto::wire::ReplicaOutcome::Committed);
    let c = &r.replicas[1];
    assert_ne!(c.outcome, barge::proto::wire::ReplicaOutcome::Committed, "{c:?}");
    assert!(c.text.contains("revoked"), "{c:?}");
    assert!(emptied(&fleet.inbox(1)), "c got nothing");
}

/// A replica agent as a process of its own (so it can be killed), from `barge agent`.
fn replica_proc(p: &std::path::Path, name: &str) -> common::proc::AgentProc {
    let conf = p.join(format!("{name}.toml"));
    if !conf.exists() {
        std::fs::create_dir_all(p.join(name).join("in")).unwrap();
        // b takes the client's data at 160 Mbit/s, so it can be killed half way.
        let rate = if name == "b" { "peer_rate_mbit = 160\n" } else { "" };
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{name}/data\"\n[transport]\nidle_timeout_secs = 2\n\
             [limits]\n{rate}[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n\
             [[import]]\nname = \"in\"\npath = \"{name}/in\"\nallow = [\"client\", \"b\", \"c\"]\nrelay_from = [\"client\", \"b\", \"c\"]\n"
        );
        std::fs::write(&conf, text).unwrap();
    }
    common::proc::AgentProc::start(&["--config", conf.to_str().unwrap()], p, &[])
}

fn chain_push(p: &std::path::Path, agents: &[(&str, &common::proc::AgentProc)]) -> std::process::Output {
    let mut args = vec![
        "push".to_string(),
        "src".into(),
        "--import".into(),
        "in".into(),
        "--json".into(),
    ];
    for (name, a) in agents {
        args.push("--to".into());
        args.push(format!("{name}@{}", a.addr));
    }
    args.extend(["--certs", "certs", "--identity", "client", "--hash-cache", "off"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::proc::barge(&args, p)
}

fn replicas_of(out: &std::process::Output) -> (serde_json::Value, Vec<serde_json::Value>) {
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    let list = v["replicas"].as_array().unwrap().clone();
    (v, list)
}

#[test]
fn the_middle_replica_killed_the_others_commit_and_a_second_run_sends_only_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    common::proc::make_certs(p, &["b", "c", "d", "client"]);
    let mib = 1 << 20;
    for i in 0..8 {
        write(&p.join(format!("src/f{i}")), &content(200 + i, 6 * mib));
    }
    let total = 48 * mib as u64;
    let (d, c) = (replica_proc(p, "d"), replica_proc(p, "c"));
    let mut b = replica_proc(p, "b");
    let staging = p.join("b/data");
    let (b_addr, c_addr, d_addr) = (b.addr.clone(), c.addr.clone(), d.addr.clone());
    let push = std::thread::spawn({
        let p = p.to_path_buf();
        move || {
            let args = [
                "push",
                "src",
                "--import",
                "in",
                "--json",
                "--to",
                &format!("b@{b_addr}"),
                "--to",
                &format!("c@{c_addr}"),
                "--to",
                &format!("d@{d_addr}"),
                "--certs",
                "certs",
                "--identity",
                "client",
                "--hash-cache",
                "off",
            ];
            common::proc::barge(&args, &p)
        }
    });
    // Kill b once it has staged a good part (but not all) of the job.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while du(&staging) < 12 * mib as u64 {
        assert!(std::time::Instant::now() < until, "b staged nothing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    b.kill();
    let out = push.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "one replica failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = replicas_of(&out);
    let outcome = |i: usize| list[i]["outcome"].as_str().unwrap().to_string();
    assert_eq!(
        [outcome(0), outcome(1), outcome(2)],
        ["failed", "committed", "committed"],
        "{list:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 3 replicas failed: b@"));
    for name in ["c", "d"] {
        assert_same_tree(&p.join("src"), &p.join(name).join("in/src"));
    }
    assert!(
        !p.join("b/in/src").exists() && common::list(&p.join("b/in")).is_empty(),
        "nothing half-written visible on b"
    );

    // b back, the same command again: b gets only the blocks it lacks, c and d nothing.
    let b = replica_proc(p, "b");
    let out = chain_push(p, &[("b", &b), ("c", &c), ("d", &d)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (v, list) = replicas_of(&out);
    assert!(list.iter().all(|r| r["outcome"] == "committed"), "{list:?}");
    let resumed = b
        .log()
        .lines()
        .find_map(|l| l.split("resumed_blocks=").nth(1))
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .expect("b logs what it resumed");
    assert!(resumed > 0, "b kept what it had verified");
    assert_eq!(
        v["sent_bytes"].as_u64().unwrap(),
        total - resumed * mib as u64,
        "only what b lacked"
    );
    assert_eq!(list[1]["received_bytes"], 0, "c had it");
    assert_eq!(list[2]["received_bytes"], 0, "d had it");
    for name in ["b", "c", "d"] {
        assert_same_tree(&p.join("src"), &p.join(name).join("in/src"));
    }
}

/// Bytes allocated to the files under `dir` (not their lengths: blocks land at their
/// offsets, so a file is as long as its furthest block long before it is full).
fn du(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.blocks() * 512).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// An agent process `name` with import target `in` (allowing `a`, `b`; `operator` among
/// its operators; relaying for `a`) and export `out` (shipped on `operator`'s order).
fn ops_proc(p: &std::path::Path, name: &str) -> common::proc::AgentProc {
    for d in ["in", "out"] {
        std::fs::create_dir_all(p.join(name).join(d)).unwrap();
    }
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{name}/data\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n\
         [[import]]\nname = \"in\"\npath = \"{name}/in\"\nallow = [\"a\", \"b\"]\nrelay_from = [\"a\"]\noperators = [\"operator\"]\n\
         [[export]]\nname = \"out\"\npath = \"{name}/out\"\nallow = [\"operator\"]\nship = [\"operator\"]\n"
    );
    let conf = p.join(format!("{name}.toml"));
    std::fs::write(&conf, text).unwrap();
    common::proc::AgentProc::start(&["--config", conf.to_str().unwrap()], p, &[])
}

#[test]
fn an_operator_ships_a_held_load_to_two_agents_and_commits_it_on_both() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    common::proc::make_certs(p, &["a", "b", "c", "operator"]);
    let (a, b, c) = (ops_proc(p, "a"), ops_proc(p, "b"), ops_proc(p, "c"));
    write(&p.join("a/out/region/1.sst"), &content(1, (1 << 20) + 3));
    write(&p.join("a/out/region/2.sst"), &content(2, 4000));
    let (pa, pb, pc) = (
        format!("a@{}", a.addr),
        format!("b@{}", b.addr),
        format!("c@{}", c.addr),
    );
    let id = ["--certs", "certs", "--identity", "operator"];
    let ship = |extra: &[&str]| {
        let mut args = vec![
            "ship", &pa, "--export", "out", "--to", &pb, "--to", &pc, "--import", "in",
        ];
        args.extend(extra);
        args.extend(id);
        common::proc::barge(&args, p)
    };
    let out = ship(&["--hold", "--json"]);
    let (v, list) = replicas_of(&out);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(list.iter().all(|r| r["outcome"] == "held"), "{v}");
    assert_eq!(v["bytes"], (1 << 20) + 3 + 4000);
    assert!(common::list(&p.join("b/in")).is_empty() && common::list(&p.join("c/in")).is_empty());
    let job = list[0]["job"].as_str().unwrap().to_string();
    let mut args = vec!["commit", &pb, &pc, &job];
    args.extend(id);
    let said = common::proc::ok(&common::proc::barge(&args, p));
    assert!(
        said.contains("b: committed job") && said.contains("c: committed job"),
        "{said}"
    );
    for name in ["b", "c"] {
        assert_same_tree(&p.join("a/out"), &p.join(name).join("in"));
    }
    // Shipped again: every replica has it already, so it is confirmed, not sent.
    let said = common::proc::ok(&ship(&[]));
    assert!(said.contains("shipped to 2 replicas"), "{said}");
    // Someone not on the export's ship list is refused, naming who and from where.
    let mut args = vec!["ship", &pa, "--export", "out", "--to", &pb, "--import", "in"];
    args.extend(["--certs", "certs", "--identity", "b"]);
    common::proc::fails(
        &common::proc::barge(&args, p),
        5,
        "b may not order ships from export \"out\"",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ship_goes_on_without_its_operator_shows_in_status_and_is_attached_to() {
    // b takes a's data at 80 Mbit/s, so the ship is still running when looked at.
    let settings = |n: &str| if n == "b" { "[limits]\npeer_rate_mbit = 80" } else { "" };
    let fleet = Fleet::start_full(&["a", "b"], "", |_| None, settings).await;
    let out = fleet.dir.path().join("a/out");
    for i in 0..4 {
        write(&out.join(format!("f{i}")), &content(300 + i, 6 << 20));
    }
    let operator = fleet.client("operator");
    let ship = ship_to(&fleet, "out", &[1], false);
    // The operator gives up after a moment: the ship goes on.
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(700),
        operator.ship(&fleet.peer(0), ship.clone()),
    )
    .await;
    assert!(gave_up.is_err(), "the ship was still running");
    let jobs = operator.jobs(&fleet.peer(0)).await.unwrap();
    let shipping: Vec<_> = jobs.iter().filter(|j| j.state == "shipping").collect();
    assert_eq!(shipping.len(), 1, "{jobs:?}");
    assert!(shipping[0].peer.starts_with("operator -> b@"), "{:?}", shipping[0]);
    assert_eq!((shipping[0].target.as_str(), shipping[0].bytes), ("out", 24 << 20));
    // Asked again, it attaches: still one ship, and b gets the bytes once.
    let again = tokio::spawn({
        let (peer, ship) = (fleet.peer(0), ship.clone());
        let operator = fleet.client("operator");
        async move { operator.ship(&peer, ship).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let jobs = operator.jobs(&fleet.peer(0)).await.unwrap();
    assert_eq!(jobs.iter().filter(|j| j.state == "shipping").count(), 1, "{jobs:?}");
    let r = again.await.unwrap().unwrap();
    assert_eq!(
        r.replicas[0].outcome,
        barge::proto::wire::ReplicaOutcome::Committed,
        "{r:?}"
    );
    assert_eq!(r.replicas[0].bytes, 24 << 20, "sent once, by the first ship");
    assert_same_tree(&out, &fleet.inbox(1));
    // Others do not see it.
    let jobs = fleet.client("client").jobs(&fleet.peer(0)).await.unwrap();
    assert!(jobs.iter().all(|j| j.state != "shipping"), "{jobs:?}");
}

/// A tmpfs of `mib` MiB mounted at `dir`; unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, mib: u64) -> Option<SmallFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "fleet-small"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: the fleet's agent processes may still hold files there while they
        // exit; a plain umount would fail "busy" and leave the mount behind.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_room_is_named_and_the_others_commit() {
    let mut fleet = Fleet::start(&["b", "c", "d"], "").await;
    // c's target and staging on a file system far too small for the job.
    fleet.agents[1].take().unwrap().shutdown().await;
    let Some(_small) = SmallFs::mount(&fleet.dir.path().join("c"), 8) else {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: this test needs root to mount a tmpfs"
        );
        eprintln!("skipping: needs root to mount a tmpfs");
        return;
    };
    fleet.agents[1] = Some(fleet.start_one(1, "").await);
    let set = data_set(&fleet, 3, 3 << 20);
    let r = fleet.push_all(&set, &PushOptions::default()).await;
    use barge::proto::wire::ReplicaOutcome::*;
    let outcomes: Vec<_> = r.replicas.iter().map(|x| x.outcome).collect();
    assert_eq!(outcomes, [Committed, Failed, Committed], "{:?}", r.replicas);
    assert_eq!(
        r.replicas[1].code,
        barge::proto::wire::code::NO_SPACE,
        "{:?}",
        r.replicas[1]
    );
    assert_eq!(r.bytes_sent, 9 << 20, "the sender still sent once");
    assert_same_tree(&fleet.src(), &fleet.inbox(0));
    assert_same_tree(&fleet.src(), &fleet.inbox(2));
    assert!(list(&fleet.inbox(1)).is_empty(), "nothing on the full replica");
}
