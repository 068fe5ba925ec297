//! `cargo bench --bench transfer`: barge against its baselines, in one run, on this machine.
//!
//! Workloads (scaled by `BARGE_BENCH_SCALE`, default 1): W1 one 2 GiB file, W2 4,096
//! files of 256 KiB, W3 20,000 files of 4 KiB. Rows, interleaved round by round so
//! that machine noise hits all of them alike (`BARGE_BENCH_ROUNDS`, default 3, medians
//! reported):
//! - `tcp`: plain TCP copy, sender `sendfile`, receiver writes the files and syncs
//!   them (`syncfs`) before it answers; no encryption, no hashing. The baseline.
//! - `cp`: local copy of the tree then `sync`: the file-creation floor.
//! - `tar`: `tar -cf - | socat` to a receiver that pipes the socket into `tar -xf -`
//!   and syncs (`syncfs`): a plain pipeline, reading and creating in two processes;
//!   1 MiB tar records and socket buffers.
//!   Skipped with a message without `socat`.
//! - `rsync`: `rsync -a --whole-file` over ssh (AES-128-GCM) to a private `sshd` on
//!   loopback, then `sync`. Its CPU is the whole machine's busy time during the run
//!   (`/proc/stat`: sshd's children are not ours to reap), its RSS the client's only.
//!   Needs root, `rsync` and `openssh-server`; skipped with a message without them.
//! - `barge`: a real `barge agent` process and a real `barge push` process, over QUIC.
//! - `b-tls`: the same over the TCP data lane with TLS (`tcp_lane = "tls"`, `push --tcp-lane`).
//! - `b-tcp`: the same over the clear-text TCP lane (`tcp_lane = "cleartext"`, sendfile).
//!
//! barge's hash cache persists between rounds (as it does between pushes in real use),
//! so from the second round on the sender does not hash; the median reflects that.
//! - `quinn` (W1 only): quinn alone, memory to memory, barge's transport settings, no
//!   disk and no hashing: the ceiling of the QUIC path with both ends on these cores.
//!
//! `BARGE_BENCH_ROWS=cp,barge` runs only those rows (and `tcp`, the baseline);
//! `BARGE_BENCH_ONLY=W3` only that workload.
//!
//! The QUIC rows (`barge` and `quinn`) use barge's default path-MTU ceiling, 1,452
//! bytes; `BARGE_BENCH_MTU=8952` sets both ends as on a jumbo-frame network (loopback
//! carries 64 KiB packets, and the TCP baseline uses them).
//!
//! Every row runs as two processes (or one for `cp`), and their CPU time and peak
//! memory come from `wait4`. Before each timed run the previous copy is deleted, the
//! page cache dropped (when root) and the source read again, so each run starts warm
//! and from the same disk state (see shared/MEASURING.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const BARGE: &str = env!("CARGO_BIN_EXE_barge");

#[path = "transfer/chart.rs"]
mod chart;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__role") {
        roles::run(&args[2..]);
        return;
    }
    let scale: f64 = std::env::var("BARGE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let rounds: usize = std::env::var("BARGE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("BARGE_BENCH_ONLY").unwrap_or_default();
    let work = bench_dir();
    println!(
        "barge transfer bench: scale {scale}, {rounds} rounds, data in {}",
        work.display()
    );
    let certs = make_certs(&work);
    let sshd = Sshd::start(&work);
    let mut groups = Vec::new();
    let workloads = [
        ("W1", 1usize, ((2u64 << 30) as f64 * scale) as u64),
        ("W2", (4096.0 * scale).max(1.0) as usize, 256 << 10),
        ("W3", (20_000.0 * scale).max(1.0) as usize, 4 << 10),
    ];
    for (name, count, size) in workloads {
        if !only.is_empty() && !only.split(',').any(|w| w == name) {
            continue;
        }
        let src = generate(&work, name, count, size);
        let bytes = count as u64 * size;
        let mut rows: Vec<(&str, Vec<Sample>)> = vec![
            ("tcp", vec![]),
            ("cp", vec![]),
            ("barge", vec![]),
            ("b-tls", vec![]),
            ("b-tcp", vec![]),
        ];
        if have("socat") {
            rows.push(("tar", vec![]));
        } else {
            eprintln!("skipping the tar | socat row: socat is not installed (apt-get install socat)");
        }
        if sshd.is_some() {
            rows.push(("rsync", vec![]));
        }
        if name == "W1" {
            rows.push(("quinn", vec![]));
        }
        let keep = std::env::var("BARGE_BENCH_ROWS").unwrap_or_default();
        if !keep.is_empty() {
            // Always keep the first row (tcp): every ratio is against it.
            rows.retain(|(r, _)| *r == "tcp" || keep.split(',').any(|k| k == *r));
        }
        for round in 0..rounds {
            // Rotate the order each round so no row always runs first after the reset.
            rows.rotate_left(round.min(1));
            for (row, samples) in rows.iter_mut() {
                let dst = work.join("dst");
                let trash = (count >= MANY_FILES).then(|| work.join("trash"));
                reset(&dst, &src, trash.as_deref());
                let s = match *row {
                    "tcp" => run_tcp(&src, &dst),
                    "cp" => run_cp(&src, &dst),
                    "tar" => run_tar(&src, &dst),
                    "rsync" => run_rsync(&src, &dst, sshd.as_ref().expect("sshd")),
                    "barge" => run_barge(&work, &certs, &src, &dst, None),
                    "b-tls" => run_barge(&work, &certs, &src, &dst, Some("tls")),
                    "b-tcp" => run_barge(&work, &certs, &src, &dst, Some("cleartext")),
                    _ => run_quinn(&certs, bytes),
                };
                samples.push(s);
            }
        }
        let order = ["tcp", "cp", "tar", "rsync", "barge", "b-tls", "b-tcp", "quinn"];
        rows.sort_by_key(|(r, _)| order.iter().position(|o| o == r));
        groups.push(report(name, count, bytes, &rows));
        let _ = std::fs::remove_dir_all(work.join("trash"));
    }
    let _ = std::fs::remove_dir_all(work.join("dst"));
    write_chart(&groups, scale, rounds);
}

/// The table as a picture: `BARGE_BENCH_SVG`, or `target/bench-transfer.svg`.
fn write_chart(groups: &[chart::Group], scale: f64, rounds: usize) {
    let path = std::env::var("BARGE_BENCH_SVG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-transfer.svg"));
    let date = Command::new("date").arg("+%Y-%m-%d").output().ok();
    let date = date
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let caption = format!(
        "cargo bench --bench transfer, {date}, scale {scale}, medians of {rounds} interleaved rounds, both ends on one 2-core VM"
    );
    match std::fs::write(&path, chart::svg(groups, &caption)) {
        Ok(()) => println!("\nchart: {}", path.display()),
        Err(e) => eprintln!("chart not written to {}: {e}", path.display()),
    }
}

/// The name a row has in the table of benches/README.md.
fn long_name(row: &str) -> &'static str {
    match row {
        "tcp" => "tcp (sendfile)",
        "cp" => "cp -r + sync (file-creation floor)",
        "tar" => "tar | socat + sync",
        "rsync" => "rsync over ssh + sync",
        "barge" => "barge over QUIC",
        "b-tls" => "barge over the TLS lane",
        "b-tcp" => "barge over the clear-text lane",
        _ => "quinn alone, memory to memory",
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    secs: f64,
    cpu: f64,
    send_rss_kb: u64,
    recv_rss_kb: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Prints a workload's table and returns it as a group of the chart.
fn report(name: &str, count: usize, bytes: u64, rows: &[(&str, Vec<Sample>)]) -> chart::Group {
    let med = |s: &[Sample], f: fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
    let base = med(&rows[0].1, |s| s.secs);
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("\n{name}: {count} files, {:.1} MiB", bytes as f64 / (1 << 20) as f64);
    println!(
        "  {:<6} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "row", "MB/s", "files/s", "CPU s/GiB", "send MiB", "recv MiB", "vs tcp"
    );
    for (row, s) in rows {
        let secs = med(s, |s| s.secs);
        let files = if *row == "quinn" {
            "-".to_string()
        } else {
            format!("{:.0}", count as f64 / secs)
        };
        println!(
            "  {:<6} {:>9.0} {:>9} {:>10.2} {:>10.0} {:>10.0} {:>7.2}x",
            row,
            bytes as f64 / secs / 1e6,
            files,
            med(s, |s| s.cpu) / gib,
            med(s, |s| s.send_rss_kb as f64) / 1024.0,
            med(s, |s| s.recv_rss_kb as f64) / 1024.0,
            base / secs,
        );
    }
    let secs = |r: &str| rows.iter().find(|(n, _)| *n == r).map(|(_, s)| med(s, |s| s.secs));
    if let (Some(b), Some(q)) = (secs("barge"), secs("quinn")) {
        println!("  barge over QUIC / quinn ceiling: {:.2}x", q / b);
    }
    if let (Some(b), Some(t)) = (secs("b-tls"), secs("tcp")) {
        println!("  barge over the TLS lane / tcp: {:.2}x", t / b);
    }
    if let (Some(b), Some(t)) = (secs("b-tcp"), secs("tcp")) {
        println!("  barge over the clear-text lane / tcp: {:.2}x", t / b);
    }
    if let (Some(b), Some(c)) = (secs("barge"), secs("cp")) {
        println!("  barge / cp floor: {:.2}x", c / b);
    }
    let bars = rows.iter().map(|(row, s)| {
        let secs = med(s, |s| s.secs);
        chart::Bar {
            label: long_name(row),
            ratio: base / secs,
            mbps: bytes as f64 / secs / 1e6,
        }
    });
    let mib = bytes as f64 / (1 << 20) as f64;
    let title = match count {
        1 => format!("{name}: 1 file of {mib:.0} MiB"),
        _ => format!("{name}: {count} files, {mib:.0} MiB in all"),
    };
    chart::Group {
        title,
        bars: bars.collect(),
    }
}

fn bench_dir() -> PathBuf {
    let dir = std::env::var("BARGE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn make_certs(work: &Path) -> PathBuf {
    let certs = work.join("certs");
    barge::net::certs::ensure_dev_certs(&certs, &["agent", "client"]).unwrap();
    certs
}

/// Makes (or reuses) `count` files of `size` bytes.
fn generate(work: &Path, name: &str, count: usize, size: u64) -> PathBuf {
    let src = work.join(format!("src-{name}-{count}x{size}"));
    let marker = src.join(".complete");
    if marker.exists() {
        return src;
    }
    let _ = std::fs::remove_dir_all(&src);
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    for i in 0..count {
        let path = src.join(format!("d{:03}/f{i:06}", i % 256));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        let mut xof = blake3::Hasher::new().update(&(i as u64).to_le_bytes()).finalize_xof();
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            xof.fill(&mut buf[..n]);
            f.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    }
    std::fs::write(&marker, b"").unwrap();
    sync_all();
    src
}

fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// From this many files on, a workload's previous copies are moved aside and deleted
/// only once all its rows ran. On this journal-less ext4 a file created within a minute
/// of the deletion of another skips the inodes deleted meanwhile (`recently_deleted`):
/// 20,000 files deleted before each run made creating the next 20,000 cost what the
/// runs before happened to delete (tar alone: 1.4 to 2.1 s in four runs in a row), and
/// that is noise, not the row's cost.
const MANY_FILES: usize = 10_000;

/// Removes the previous copy (or, with `trash`, moves it there), syncs, drops clean
/// caches (as root), re-reads the source.
fn reset(dst: &Path, src: &Path, trash: Option<&Path>) {
    match trash {
        Some(t) if dst.exists() => {
            std::fs::create_dir_all(t).unwrap();
            let n = std::fs::read_dir(t).unwrap().count();
            std::fs::rename(dst, t.join(n.to_string())).unwrap();
        }
        _ => {
            let _ = std::fs::remove_dir_all(dst);
        }
    }
    sync_all();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", b"1");
    let mut buf = vec![0u8; 1 << 20];
    for f in files(src) {
        let mut file = std::fs::File::open(&f).unwrap();
        while file.read(&mut buf).unwrap() > 0 {}
    }
    std::fs::create_dir_all(dst).unwrap();
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with(".complete") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Waits for a child and returns its CPU seconds and peak RSS (KiB).
fn reap(child: &mut Child) -> (f64, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status}"
    );
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime) + t(ru.ru_stime), ru.ru_maxrss as u64)
}

fn me() -> PathBuf {
    std::env::current_exe().unwrap()
}

/// Starts a child and reads lines of its stdout until one starts with `prefix`.
/// The caller reaps the child with `reap` (wait4), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn start_until(cmd: &mut Command, prefix: &str) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.wait();
            panic!("child exited before {prefix}");
        }
        if let Some(rest) = line.strip_prefix(prefix) {
            let rest = rest.trim().to_string();
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return (child, rest);
        }
    }
}

fn run_tcp(src: &Path, dst: &Path) -> Sample {
    let mut recv = Command::new(me());
    recv.args(["__role", "tcp-recv"]).arg(dst);
    run_pair(recv, |addr| {
        let mut send = Command::new(me());
        send.args(["__role", "tcp-send"]).arg(src).arg(addr);
        send
    })
}

/// Starts a receiver role, then the sender role given its address; times the sender.
fn run_pair(mut recv: Command, send: impl FnOnce(&str) -> Command) -> Sample {
    let (mut recv, addr) = start_until(&mut recv, "listening ");
    let t = Instant::now();
    let mut send = send(&addr).spawn().unwrap();
    let (send_cpu, send_rss) = reap(&mut send);
    let secs = t.elapsed().as_secs_f64();
    let (recv_cpu, recv_rss) = reap(&mut recv);
    Sample {
        secs,
        cpu: send_cpu + recv_cpu,
        send_rss_kb: send_rss,
        recv_rss_kb: recv_rss,
    }
}

/// `tar -cf - | socat` into the `tar-recv` role; timed until the receiver synced.
fn run_tar(src: &Path, dst: &Path) -> Sample {
    let mut recv = Command::new(me());
    recv.args(["__role", "tar-recv"]).arg(dst);
    let (mut recv, addr) = start_until(&mut recv, "listening ");
    let t = Instant::now();
    // 1 MiB records and buffers, as a tuned pipe would be (tar's default is 10 KiB,
    // socat's 8 KiB).
    let pipeline = format!(
        "tar -C '{}' -b 2048 -cf - . | socat -b 1048576 -u - TCP:{addr}",
        src.display()
    );
    let mut send = Command::new("sh").arg("-c").arg(pipeline).spawn().unwrap();
    let (send_cpu, send_rss) = reap(&mut send);
    let (recv_cpu, recv_rss) = reap(&mut recv);
    Sample {
        secs: t.elapsed().as_secs_f64(),
        cpu: send_cpu + recv_cpu,
        send_rss_kb: send_rss,
        recv_rss_kb: recv_rss,
    }
}

/// A private sshd on a loopback port, for the rsync row; killed when dropped.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Sshd {
    /// Starts one (keys and config in `work/ssh`), or says why the row is skipped.
    /// The child is reaped by `Drop`, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn start(work: &Path) -> Option<Sshd> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !have("rsync") || !have("ssh-keygen") || !Path::new("/usr/sbin/sshd").exists() {
            eprintln!("skipping the rsync row: needs root, rsync and openssh-server");
            return None;
        }
        let dir = work.join("ssh");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        for key in ["host_key", "client_key"] {
            let made = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(dir.join(key))
                .status();
            assert!(made.unwrap().success(), "ssh-keygen");
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd.conf"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let key = dir.join("client_key");
                return Some(Sshd { child, port, key });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("sshd did not listen on {port}");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine's busy CPU seconds so far (all cores, from `/proc/stat`).
fn busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu.get(7).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// rsync over ssh to the private sshd, then `sync`.
fn run_rsync(src: &Path, dst: &Path, sshd: &Sshd) -> Sample {
    let ssh = format!(
        "ssh -F /dev/null -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o LogLevel=ERROR -o BatchMode=yes -c aes128-gcm@openssh.com",
        sshd.port,
        sshd.key.display()
    );
    let cmd = format!(
        "rsync -a --whole-file -e '{ssh}' '{}/' 'root@127.0.0.1:{}/' && sync",
        src.display(),
        dst.display()
    );
    let (busy, t) = (busy_secs(), Instant::now());
    let mut rsync = Command::new("sh").arg("-c").arg(cmd).spawn().unwrap();
    let (_, rss) = reap(&mut rsync);
    Sample {
        secs: t.elapsed().as_secs_f64(),
        cpu: busy_secs() - busy,
        send_rss_kb: rss,
        recv_rss_kb: 0,
    }
}

/// Whether `tool` is on the PATH.
fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

fn run_cp(src: &Path, dst: &Path) -> Sample {
    let t = Instant::now();
    let mut cp = Command::new("sh")
        .arg("-c")
        .arg(format!("cp -r '{}' '{}/' && sync", src.display(), dst.display()))
        .spawn()
        .unwrap();
    let (cpu, rss) = reap(&mut cp);
    Sample {
        secs: t.elapsed().as_secs_f64(),
        cpu,
        send_rss_kb: rss,
        recv_rss_kb: rss,
    }
}

/// Ceiling of path-MTU discovery for the QUIC rows (see the module docs).
fn bench_mtu() -> u16 {
    std::env::var("BARGE_BENCH_MTU").map_or(1452, |m| m.parse().expect("BARGE_BENCH_MTU is a number"))
}

/// A push with the data on QUIC (`lane` None) or on the TCP lane, `"tls"` or
/// `"cleartext"`.
fn run_barge(work: &Path, certs: &Path, src: &Path, dst: &Path, lane: Option<&str>) -> Sample {
    let config = work.join("agent.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/agent.pem\"\nkey = \"{c}/agent.key\"\n\
         [transport]\nmax_mtu = {mtu}\n\
         [[import]]\nname = \"bench\"\npath = \"{}\"\nallow = [\"client\"]\ntcp_lane = \"{lane}\"\n",
        work.join("agent-data").display(),
        dst.display(),
        c = certs.display(),
        mtu = bench_mtu(),
        lane = lane.unwrap_or("off"),
    );
    std::fs::write(&config, text).unwrap();
    let mut agent = Command::new(BARGE)
        .args(["agent", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = agent_addr(&mut agent);
    if std::env::var_os("BARGE_BENCH_VERBOSE").is_some() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        eprintln!("push starts at unix {:.3}", now.as_secs_f64());
    }
    let t = Instant::now();
    let mut push = Command::new(BARGE)
        .arg("push")
        .arg(src)
        .args(["--to", &format!("agent@{addr}"), "--import", "bench", "--certs"])
        .arg(certs)
        .args(["--identity", "client", "--max-mtu", &bench_mtu().to_string()])
        .args(if lane.is_some() { &["--tcp-lane"][..] } else { &[][..] })
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (send_cpu, send_rss) = reap(&mut push);
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let (recv_cpu, recv_rss) = reap(&mut agent);
    Sample {
        secs,
        cpu: send_cpu + recv_cpu,
        send_rss_kb: send_rss,
        recv_rss_kb: recv_rss,
    }
}

fn agent_addr(agent: &mut Child) -> String {
    let mut err = BufReader::new(agent.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "agent exited");
        if let Some(rest) = line.split("addr=").nth(1).filter(|_| line.contains("agent listening")) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            // BARGE_BENCH_VERBOSE shows the agent's log (its job timings) on stderr.
            match std::env::var_os("BARGE_BENCH_VERBOSE") {
                Some(_) => std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr())),
                None => std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink())),
            };
            return addr;
        }
    }
}

fn run_quinn(certs: &Path, bytes: u64) -> Sample {
    let mut recv = Command::new(me());
    recv.args(["__role", "quinn-recv"]).arg(certs);
    run_pair(recv, |addr| {
        let mut send = Command::new(me());
        send.args(["__role", "quinn-send"])
            .arg(certs)
            .arg(addr)
            .arg(bytes.to_string());
        send
    })
}

/// The child processes of the baseline rows.
mod roles {
    use super::*;

    pub fn run(args: &[String]) {
        match args[0].as_str() {
            "tcp-recv" => tcp_recv(Path::new(&args[1])),
            "tcp-send" => tcp_send(Path::new(&args[1]), &args[2]),
            "tar-recv" => tar_recv(Path::new(&args[1])),
            "quinn-recv" => quinn_recv(Path::new(&args[1])),
            "quinn-send" => quinn_send(Path::new(&args[1]), &args[2], args[3].parse().unwrap()),
            other => panic!("unknown role {other}"),
        }
    }

    /// Pipes one connection into `tar -xf -` in `dst`, then makes the tree durable.
    fn tar_recv(dst: &Path) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        println!("listening {}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let (mut s, _) = l.accept().unwrap();
        std::fs::create_dir_all(dst).unwrap();
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(dst)
            .args(["-b", "2048", "-xf", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut into = tar.stdin.take().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            into.write_all(&buf[..n]).unwrap();
        }
        drop(into);
        assert!(tar.wait().unwrap().success(), "tar -x failed");
        let d = std::fs::File::open(dst).unwrap();
        // SAFETY: d is an open descriptor.
        assert_eq!(unsafe { libc::syncfs(d.as_raw_fd()) }, 0);
    }

    /// Frames: name length (u32), name, size (u64), bytes; a zero name length ends.
    fn tcp_send(src: &Path, addr: &str) {
        let mut s = TcpStream::connect(addr).unwrap();
        for f in files(src) {
            let name = f.strip_prefix(src).unwrap().to_string_lossy().to_string();
            let file = std::fs::File::open(&f).unwrap();
            let size = file.metadata().unwrap().len();
            let mut head = (name.len() as u32).to_be_bytes().to_vec();
            head.extend(name.as_bytes());
            head.extend(size.to_be_bytes());
            s.write_all(&head).unwrap();
            let mut off: libc::off_t = 0;
            while (off as u64) < size {
                let left = (size - off as u64).min(1 << 30) as usize;
                // SAFETY: both descriptors are open; off is ours.
                let n = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
                assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
            }
        }
        s.write_all(&0u32.to_be_bytes()).unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
    }

    fn tcp_recv(dst: &Path) {
        let ip = std::env::var("BARGE_BENCH_BIND").unwrap_or_else(|_| "127.0.0.1".into());
        let l = TcpListener::bind((ip.as_str(), 0)).unwrap();
        println!("listening {}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let (mut s, _) = l.accept().unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut dirs = std::collections::BTreeSet::new();
        loop {
            let mut n = [0u8; 4];
            s.read_exact(&mut n).unwrap();
            let n = u32::from_be_bytes(n) as usize;
            if n == 0 {
                break;
            }
            let mut name = vec![0u8; n];
            s.read_exact(&mut name).unwrap();
            let mut size = [0u8; 8];
            s.read_exact(&mut size).unwrap();
            let mut left = u64::from_be_bytes(size);
            let path = dst.join(String::from_utf8(name).unwrap());
            let parent = path.parent().unwrap().to_path_buf();
            if dirs.insert(parent.clone()) {
                std::fs::create_dir_all(&parent).unwrap();
            }
            let mut f = std::fs::File::create(&path).unwrap();
            let mut written = 0i64;
            while left > 0 {
                let k = (left as usize).min(buf.len());
                s.read_exact(&mut buf[..k]).unwrap();
                f.write_all(&buf[..k]).unwrap();
                left -= k as u64;
                written += k as i64;
                // Start writeback of every 16 MiB as it is written, as a careful streaming
                // writer does, so that the final sync does not find gigabytes dirty.
                if written % (16 << 20) == 0 {
                    // SAFETY: f is open; the range is what was just written.
                    unsafe {
                        libc::sync_file_range(
                            f.as_raw_fd(),
                            written - (16 << 20),
                            16 << 20,
                            libc::SYNC_FILE_RANGE_WRITE,
                        )
                    };
                }
            }
        }
        let copied = started.elapsed();
        // Durable before answering: every file and folder of the file system.
        let d = std::fs::File::open(dst).unwrap();
        // SAFETY: d is an open descriptor.
        assert_eq!(unsafe { libc::syncfs(d.as_raw_fd()) }, 0);
        s.write_all(&[1]).unwrap();
        if std::env::var_os("BARGE_BENCH_VERBOSE").is_some() {
            eprintln!("tcp-recv: copied in {copied:?}, durable after {:?}", started.elapsed());
        }
    }

    /// barge's default tuning with the bench's MTU ceiling, or what BARGE_BENCH_CC /
    /// BARGE_BENCH_BW_MBIT say.
    fn bench_tuning() -> barge::net::quic::Tuning {
        let mut t = barge::net::quic::Tuning::default();
        if let Ok(cc) = std::env::var("BARGE_BENCH_CC") {
            t.congestion = cc.parse().unwrap();
        }
        t.max_mtu = super::bench_mtu();
        if let Ok(b) = std::env::var("BARGE_BENCH_BW_MBIT") {
            t.bandwidth_mbit = b.parse().unwrap();
        }
        t
    }

    fn quinn_endpoint_configs(certs: &Path, name: &str) -> barge::net::tls::TlsMaterial {
        barge::net::tls::TlsMaterial::load(&barge::net::tls::TlsFiles::in_dir(certs, name)).unwrap()
    }

    /// A quinn endpoint on a socket made as barge makes its own (buffer sizes included).
    fn endpoint(addr: &str, server: Option<quinn::ServerConfig>, tuning: &barge::net::quic::Tuning) -> quinn::Endpoint {
        let (sock, _) = barge::net::quic::udp_socket(addr.parse().unwrap(), tuning).unwrap();
        barge::net::quic::endpoint(sock, server, tuning).unwrap()
    }

    fn quinn_recv(certs: &Path) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let tls = quinn_endpoint_configs(certs, "agent");
            let tuning = bench_tuning();
            let ep = endpoint("127.0.0.1:0", Some(tls.server_config(&tuning).unwrap()), &tuning);
            println!("listening {}", ep.local_addr().unwrap());
            std::io::stdout().flush().unwrap();
            let conn = ep.accept().await.unwrap().await.unwrap();
            let mut s = conn.accept_uni().await.unwrap();
            while s.read_chunk(usize::MAX, true).await.unwrap().is_some() {}
            let (mut tx, _rx) = conn.accept_bi().await.unwrap();
            tx.write_all(&[1]).await.unwrap();
            tx.finish().unwrap();
            conn.closed().await;
        });
    }

    fn quinn_send(certs: &Path, addr: &str, bytes: u64) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let tls = quinn_endpoint_configs(certs, "client");
            let mut ep = endpoint("0.0.0.0:0", None, &bench_tuning());
            ep.set_default_client_config(tls.client_config(&bench_tuning()).unwrap());
            let conn = ep.connect(addr.parse().unwrap(), "agent").unwrap().await.unwrap();
            let mut s = conn.open_uni().await.unwrap();
            let block = bytes::Bytes::from(vec![7u8; 1 << 20]);
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                s.write_chunk(block.slice(..n)).await.unwrap();
                left -= n as u64;
            }
            s.finish().unwrap();
            let (_tx, mut rx) = conn.open_bi().await.unwrap();
            // The bi stream is only opened once data is written on it; nudge it.
            let mut tx = _tx;
            tx.write_all(&[0]).await.unwrap();
            let mut ack = [0u8; 1];
            rx.read_exact(&mut ack).await.unwrap();
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
        });
    }
}
