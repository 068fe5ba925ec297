//! Disk full, bytes flipped in staging, many jobs at once, a lossy link.

use crate::check::{
    content, free, list, settled, staged_job, verified_blocks, verified_staged, visible, write, Job, Visible,
};
use crate::host::Host;
use crate::{Ctx, Row};
use rand::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A 200 MiB ext4 file system on a loop device, mounted at `dir`; unmounted on drop.
pub struct LoopFs {
    pub dir: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    pub fn new(dir: &Path, mib: u64) -> Result<LoopFs, String> {
        let image = dir.with_extension("img");
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let run = |c: &mut Command| -> Result<(), String> {
            let out = c.output().map_err(|e| e.to_string())?;
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
            }
        };
        run(Command::new("truncate").arg("-s").arg(format!("{mib}M")).arg(&image))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image))?;
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(dir))?;
        Ok(LoopFs {
            dir: dir.to_path_buf(),
            image,
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

const RESERVE: u64 = 64 << 20;

/// Disk full: a job refused up front when it can not fit, three concurrent jobs that
/// together do not fit, and space taken from outside while a job runs. Each time: a
/// named error, nothing visible, the reserve kept, the agent serving afterwards.
pub fn disk_full(ctx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![
        Row::new("disk full: a job that can not fit, refused up front"),
        Row::new("disk full: three concurrent jobs that together do not fit"),
        Row::new("disk full: space taken from outside during a job"),
    ];
    let dir = ctx.work.join("full");
    let mut host = Host::new(
        &dir,
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"small\"\nallow = [\"ops\"]\n",
    );
    let fs = match LoopFs::new(&dir.join("small"), 200) {
        Ok(fs) => fs,
        Err(e) => {
            rows.iter_mut()
                .for_each(|r| r.record(Err(format!("no loop file system: {e}"))));
            return rows;
        }
    };
    // 20 MB/s for all of this sender's data, so a job runs long enough to take space from under it.
    host.top = "[limits]\npeer_rate_mbit = 160\n".into();
    host.start(None);
    for _ in 0..ctx.count(3) {
        rows[0].record(too_big(&host, &fs.dir));
        rows[1].record(three_at_once(&host, &fs.dir));
        rows[2].record(taken_meanwhile(&host, &fs.dir));
    }
    rows
}

fn src_file(host: &Host, name: &str, bytes: u64) -> String {
    let p = host.dir.join("src").join(name).join("data");
    if std::fs::metadata(&p).map(|m| m.len()).ok() != Some(bytes) {
        write(&p, &content(bytes, bytes as usize));
    }
    p.parent().unwrap().to_str().unwrap().to_string()
}

/// Nothing of any job in the file system but `lost+found`, and the reserve free.
fn clean_and_reserved(small: &Path) -> Result<(), String> {
    let shown: Vec<String> = list(small)
        .into_iter()
        .filter(|f| !f.starts_with("lost+found"))
        .collect();
    if !shown.is_empty() {
        return Err(format!("visible after the failure: {shown:?}"));
    }
    if staged_job(small).is_some() {
        return Err("a failed job's staging folder is still there".into());
    }
    match free(small) >= RESERVE {
        true => Ok(()),
        false => Err(format!("only {} bytes free, the reserve is {RESERVE}", free(small))),
    }
}

fn empty(small: &Path) {
    for e in std::fs::read_dir(small).unwrap().flatten() {
        if e.file_name() != "lost+found" {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn too_big(host: &Host, small: &Path) -> Result<(), String> {
    empty(small);
    let what = src_file(host, "huge", free(small) - RESERVE + (10 << 20));
    let before = free(small);
    let r = host.push("ops", &[&what], "in", &[]).wait();
    if r.code != 5 || !r.stderr.contains("not enough free space") || !r.stderr.contains("retry after") {
        return Err(format!(
            "expected exit 5, not enough free space, retry after: {} {}",
            r.code, r.stderr
        ));
    }
    clean_and_reserved(small)?;
    match free(small) + (1 << 20) >= before {
        true => Ok(()),
        false => Err("a refused job used space".into()),
    }
}

fn three_at_once(host: &Host, small: &Path) -> Result<(), String> {
    empty(small);
    let each = (free(small) - RESERVE) * 2 / 5;
    let names: Vec<String> = (0..3).map(|i| src_file(host, &format!("third{i}"), each - i)).collect();
    let pushes: Vec<_> = names.iter().map(|n| host.push("ops", &[n], "in", &[])).collect();
    let done: Vec<_> = pushes.into_iter().map(|p| p.wait()).collect();
    let ok = done.iter().filter(|r| r.code == 0).count();
    let refused = done
        .iter()
        .filter(|r| r.code == 5 && r.stderr.contains("promised to jobs in flight") && r.stderr.contains("retry after"))
        .count();
    if (ok, refused) != (2, 1) {
        let codes: Vec<_> = done.iter().map(|r| (r.code, r.stderr.trim().to_string())).collect();
        return Err(format!("expected 2 committed and 1 refused up front: {codes:?}"));
    }
    if free(small) < RESERVE {
        return Err(format!("{} bytes free, the reserve is {RESERVE}", free(small)));
    }
    empty(small);
    Ok(())
}

fn taken_meanwhile(host: &Host, small: &Path) -> Result<(), String> {
    empty(small);
    let what = src_file(host, "large", (free(small) - RESERVE) * 7 / 10);
    let push = host.push("ops", &[&what], "in", &[]);
    std::thread::sleep(Duration::from_millis(800));
    let filler = small.join("filler");
    let take = free(small) / 2;
    let st = Command::new("fallocate")
        .arg("-l")
        .arg(take.to_string())
        .arg(&filler)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        push.kill();
        return Err("fallocate failed".into());
    }
    let r = push.wait();
    let _ = std::fs::remove_file(&filler);
    if r.code != 6 || !(r.stderr.contains("filled up") || r.stderr.contains("is full")) {
        return Err(format!(
            "expected exit 6 naming the full file system: {} {}",
            r.code,
            r.stderr.trim()
        ));
    }
    std::fs::write(&filler, b"").ok();
    let _ = std::fs::remove_file(&filler);
    clean_and_reserved(small)?;
    // Still serving.
    let small_job = src_file(host, "after", 1 << 20);
    let r = host.push("ops", &[&small_job], "in", &[]).wait();
    match r.code {
        0 => Ok(()),
        c => Err(format!("the agent did not serve afterwards: {c} {}", r.stderr)),
    }
}

/// Bytes flipped in staged files of a held job and of an interrupted job: caught,
/// never committed; sending again replaces just the bad blocks.
pub fn flips(ctx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![
        Row::new("bytes flipped in a held job's staged files"),
        Row::new("bytes flipped in an interrupted job's staged files"),
    ];
    let mut host = Host::new(
        &ctx.work.join("flips"),
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    // 50 MB/s, so the 64 MiB push is still running when it is interrupted.
    host.top = "[limits]\npeer_rate_mbit = 400\n".into();
    let target = host.dir.join("in");
    std::fs::create_dir_all(&target).unwrap();
    let held_src = host.dir.join("src/load");
    write(&held_src.join("big.sst"), &content(1, 3 << 20));
    for i in 0..10u64 {
        write(&held_src.join(format!("s{i}.sst")), &content(10 + i, 5000));
    }
    let intr_src = host.dir.join("src/intr");
    write(&intr_src.join("big.sst"), &content(2, 64 << 20));
    host.start(None);
    for _ in 0..ctx.count(10) {
        if !host.running() {
            host.start(None);
        }
        rows[0].record(flip_held(ctx, &mut host, &held_src));
        if !host.running() {
            host.start(None);
        }
        rows[1].record(flip_interrupted(ctx, &mut host, &intr_src));
    }
    rows
}

fn flip(path: &Path, at: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
    b[0] ^= 0x40;
    f.write_all_at(&b, at).map_err(|e| e.to_string())
}

fn flip_held(ctx: &mut Ctx, host: &mut Host, src: &Path) -> Result<(), String> {
    let target = host.dir.join("in");
    let _ = std::fs::remove_dir_all(target.join("load"));
    let job = Job::of_folder(src);
    let what = src.to_str().unwrap();
    let r = host.push("ops", &[what], "in", &["--hold"]).wait();
    let id = r
        .json
        .as_ref()
        .and_then(|j| j["job"].as_str())
        .map(String::from)
        .ok_or(r.stderr)?;
    let (rel, (_, h)) = job.files.iter().nth(ctx.rng.random_range(0..job.files.len())).unwrap();
    let at = ctx.rng.random_range(0..h.size);
    let staged = staged_job(&target).ok_or("nothing staged")?.join("files").join(rel);
    flip(&staged, at)?;
    let (code, _, err) = host.run(&["commit", &host.peer(), &id]);
    let name = rel.rsplit('/').next().unwrap();
    if code != 5 || !err.contains("no longer match") || !err.contains(name) {
        return Err(format!("commit of a corrupted held job: exit {code}: {}", err.trim()));
    }
    if visible(&job, &target) != Visible::None {
        return Err("a corrupted held job became visible".into());
    }
    let expect = verified_staged(&job, &target);
    let again = host.push("ops", &[what], "in", &["--hold"]).wait();
    if again.code != 0 || again.num("held_blocks") != expect {
        return Err(format!(
            "push --hold again: exit {}, held {} of {expect} good blocks",
            again.code,
            again.num("held_blocks")
        ));
    }
    let (code, _, err) = host.run(&["commit", &host.peer(), &id]);
    match (code, visible(&job, &target)) {
        (0, Visible::All) => Ok(()),
        (c, v) => Err(format!(
            "commit after the repair: exit {c} {}, target {v:?}",
            err.trim()
        )),
    }
}

fn flip_interrupted(ctx: &mut Ctx, host: &mut Host, src: &Path) -> Result<(), String> {
    let target = host.dir.join("in");
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target).unwrap();
    let job = Job::of_folder(src);
    let what = src.to_str().unwrap();
    let push = host.push("ops", &[what], "in", &[]);
    let started = std::time::Instant::now();
    while verified_staged(&job, &target) < 8 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    host.kill();
    push.kill();
    let good = settled(&job, &target);
    if good == 0 {
        return Err("nothing was staged before the interruption".into());
    }
    let blocks = verified_blocks(&job, &target);
    let (rel, block) = &blocks[ctx.rng.random_range(0..blocks.len())];
    let staged = staged_job(&target).ok_or("nothing staged")?.join("files").join(rel);
    flip(&staged, block * (1 << 20) + ctx.rng.random_range(0..1 << 20))?;
    let expect = verified_staged(&job, &target);
    host.start(None);
    let r = host.push("ops", &[what], "in", &[]).wait();
    if r.code != 0 || r.num("held_blocks") != expect {
        return Err(format!(
            "push again: exit {}, held {} of {expect} good blocks: {}",
            r.code,
            r.num("held_blocks"),
            r.stderr.trim()
        ));
    }
    match visible(&job, &target) {
        Visible::All => Ok(()),
        other => Err(format!("target after the push again: {other:?}")),
    }
}

/// 8 clients (identities), each with 8 jobs of 20 MiB at once, against the agent's default
/// `max_jobs` (64) and `max_jobs = 16`: every job committed and exact, or refused up
/// front with a retry-after. Returns the rows and each run's peak agent RSS (MiB).
pub fn concurrency(ctx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for max_jobs in [64, 16] {
        let mut row = Row::new(&format!(
            "8 clients x 8 concurrent jobs of 20 MiB, max_jobs = {max_jobs}"
        ));
        let dir = ctx.work.join(format!("many{max_jobs}"));
        // Eight clients are eight hosts: eight identities (one identity may hold only
        // its share of the agent's job slots).
        let allow = (0..8).map(|c| format!("\"c{c}\"")).collect::<Vec<_>>().join(", ");
        let mut host = Host::new(
            &dir,
            "127.0.0.1",
            &format!("[[import]]\nname = \"in\"\npath = \"in\"\nallow = [{allow}]\n"),
        );
        for c in 0..8 {
            if !dir.join(format!("certs/c{c}.pem")).exists() {
                let name = format!("c{c}");
                assert_eq!(
                    crate::host::barge(&["certs", "issue", &name, "--dir", "certs"], &dir).0,
                    0
                );
            }
        }
        std::fs::create_dir_all(dir.join("in")).unwrap();
        let size = ((20.0 * ctx.scale.min(1.0)).max(2.0) as usize) << 20;
        for c in 0..8 {
            for j in 0..8 {
                let p = dir.join(format!("src/c{c}/j{c}{j}/data"));
                if !p.exists() {
                    write(&p, &content((c * 8 + j) as u64, size));
                }
            }
        }
        host.top = format!("max_jobs = {max_jobs}");
        host.start(None);
        let results = run_clients(&dir, &host.peer());
        let (mut committed, mut refused) = (0, 0);
        for (c, j, r) in results {
            let job = Job::of_folder(&dir.join(format!("src/c{c}/j{c}{j}")));
            let out = match r {
                Ok(_) if visible(&job, &dir.join("in")) == Visible::All => {
                    committed += 1;
                    Ok(())
                }
                Ok(_) => Err(format!("job {c}/{j} committed but not exact")),
                Err(barge::transfer::TransferError::Rejected(x)) if x.retry_after > 0 => {
                    refused += 1;
                    match visible(&job, &dir.join("in")) {
                        Visible::None => Ok(()),
                        v => Err(format!("refused job {c}/{j} shows {v:?}")),
                    }
                }
                Err(e) => Err(format!("job {c}/{j}: {e}")),
            };
            row.record(out);
        }
        let rss = host.agent().peak_rss_mib();
        row.note(format!(
            "{committed} committed, {refused} refused up front with a retry-after; peak agent RSS {rss} MiB"
        ));
        ctx.peaks.push((max_jobs, rss));
        rows.push(row);
    }
    rows
}

type JobResult = Result<barge::transfer::SendReport, barge::transfer::TransferError>;

/// Runs the 64 pushes from 8 clients (one QUIC endpoint each) at once.
fn run_clients(dir: &Path, peer: &str) -> Vec<(usize, usize, JobResult)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let peer: barge::client::Peer = peer.parse().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..8 {
            let tls = barge::net::tls::TlsFiles::in_dir(&dir.join("certs"), &format!("c{c}"));
            let client = std::sync::Arc::new(barge::client::Client::new(&tls).unwrap());
            for j in 0..8 {
                let (client, peer) = (client.clone(), peer.clone());
                let src = dir.join(format!("src/c{c}/j{c}{j}"));
                tasks.spawn(async move {
                    let opts = barge::client::PushOptions::default();
                    (c, j, client.push(&peer, "in", &[src], &opts).await)
                });
            }
        }
        let mut out = vec![];
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    })
}

/// Pushes across an emulated link that loses 5 % of packets each way (linkem).
pub fn lossy_link(ctx: &mut Ctx) -> Row {
    let mut row = Row::new("push across a link with 5 % random loss each way");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/linkem/linkem");
    let linkem = std::env::var("LINKEM").map(PathBuf::from).unwrap_or(default);
    if !linkem.exists() {
        row.record(Err(format!("linkem not found at {}", linkem.display())));
        return row;
    }
    // Not `output()`: the emulator it starts keeps the pipes open.
    let up = Command::new("bash")
        .arg(&linkem)
        .args(["up", "--delay", "5", "--rate", "200", "--loss", "5"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !up.is_ok_and(|s| s.success()) {
        row.record(Err("linkem up failed".into()));
        return row;
    }
    let dir = ctx.work.join("lossy");
    let host = Host::new(
        &dir,
        "10.251.0.2",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    std::fs::create_dir_all(dir.join("in")).unwrap();
    let src = dir.join("src/lossy");
    write(&src.join("big"), &content(5, 16 << 20));
    for i in 0..20u64 {
        write(&src.join(format!("s{i}")), &content(50 + i, 3000));
    }
    let job = Job::of_folder(&src);
    std::fs::write(
        dir.join("b.toml"),
        format!(
            "listen = \"{}\"\ndata_dir = \"state\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
            host.addr
        ),
    )
    .unwrap();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", "lem-b", crate::host::BARGE, "agent", "--config"])
        .arg(dir.join("b.toml"))
        .current_dir(&dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..ctx.count(3) {
        let _ = std::fs::remove_dir_all(dir.join("in/lossy"));
        let peer = host.peer();
        let args = [
            "netns",
            "exec",
            "lem-a",
            crate::host::BARGE,
            "push",
            src.to_str().unwrap(),
            "--to",
            &peer,
            "--import",
            "in",
            "--certs",
            "certs",
            "--identity",
            "ops",
            "--hash-cache",
            "off",
        ];
        let started = std::time::Instant::now();
        let out = Command::new("ip").args(args).current_dir(&dir).output().unwrap();
        let secs = started.elapsed().as_secs_f64();
        row.record(match (out.status.code(), visible(&job, &dir.join("in"))) {
            (Some(0), Visible::All) => Ok(()),
            (c, v) => Err(format!(
                "exit {c:?}, target {v:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
        row.note(format!("{:.1} MB in {secs:.1} s", job.bytes() as f64 / 1e6));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = Command::new("bash")
        .arg(&linkem)
        .arg("down")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    row
}
