//! SIGKILL at random moments: of the receiving agent during a mixed job, of the agent
//! during the import hook of 20,000 files, of the sender; and deaths at failpoints
//! inside the hand-over. After each: nothing partial or corrupt visible (once the agent
//! has restarted), and the same push completes, sending only what is missing, or is
//! confirmed as committed.

use crate::check::{content, list, settled, verified_staged, visible, write, Job, Visible};
use crate::host::Host;
use crate::{Ctx, Row};
use rand::Rng;
use std::path::Path;
use std::time::Duration;

/// The mixed job: one 200 MiB file and 300 files of 4-300 KiB.
pub fn mixed_source(work: &Path, scale: f64) -> std::path::PathBuf {
    let src = work.join("src/mixed");
    if !src.exists() {
        let big = ((200.0 * scale.min(1.0)).max(8.0) as usize) << 20;
        write(&src.join("big.sst"), &content(1, big));
        let mut rng = rand::rng();
        for i in 0..300u64 {
            let len = rng.random_range(4 << 10..=300 << 10);
            write(&src.join(format!("small/{i:03}.sst")), &content(100 + i, len));
        }
    }
    src
}

/// The 20,000 files of 4 KiB.
pub fn w3_source(work: &Path) -> std::path::PathBuf {
    let src = work.join("src/w3");
    if !src.exists() {
        for i in 0..20_000u64 {
            write(&src.join(format!("f{i:05}")), &content(i, 4096));
        }
    }
    src
}

/// Empties a target folder (and its staging area), keeping the folder.
fn clear(target: &Path) {
    if let Ok(rd) = std::fs::read_dir(target) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Median seconds of `n` complete pushes of `what` into a cleared `target`.
fn calibrate(host: &mut Host, what: &str, target: &Path, n: usize) -> f64 {
    let mut secs = vec![];
    for _ in 0..n {
        clear(target);
        let r = host.push("ops", &[what], "in", &[]).wait();
        assert_eq!(r.code, 0, "calibration push failed: {}", r.stderr);
        secs.push(r.secs);
    }
    secs.sort_by(f64::total_cmp);
    secs[secs.len() / 2]
}

/// Where the kills landed, as the restarted agent found things.
#[derive(Default)]
struct Landed {
    /// Nothing visible: the job was cut off before its commit, and resumes.
    resumed: u32,
    /// The job had committed before the kill.
    before: u32,
    /// The kill cut a commit off; the restarted agent finished it.
    finished: u32,
}

impl Landed {
    fn count(&mut self, host: &mut Host, job: &Job, target: &Path) {
        let log = host.agent().log().join("\n");
        match (
            log.contains("commit cut off by a restart finished"),
            visible(job, target),
        ) {
            (true, _) => self.finished += 1,
            (false, Visible::All) => self.before += 1,
            _ => self.resumed += 1,
        }
    }

    fn note(&self) -> String {
        format!(
            "after the restart {} jobs resumed, {} had committed before the kill, {} were cut off in their commit and finished by the restart",
            self.resumed, self.before, self.finished
        )
    }
}

/// Checks what a restarted agent shows, pushes again, and checks the end state.
fn after_restart(
    host: &mut Host,
    job: &Job,
    what: &str,
    target: &Path,
    expect_held: Option<u64>,
) -> Result<(), String> {
    let shown = visible(job, target);
    if !matches!(shown, Visible::None | Visible::All) {
        return Err(format!("after the restart the target shows {shown:?}"));
    }
    let r = host.push("ops", &[what], "in", &[]).wait();
    if r.code != 0 {
        return Err(format!("push again: exit {}: {}", r.code, r.stderr.trim()));
    }
    match (&shown, expect_held) {
        (Visible::All, _) if r.num("sent_bytes") != 0 || !r.report().contains("sent again") => {
            return Err(format!(
                "committed before, but the push again was not confirmed: {:?}",
                r.json
            ));
        }
        (Visible::None, Some(held)) if r.num("held_blocks") != held => {
            return Err(format!(
                "push again found {} blocks held, {held} verified in staging",
                r.num("held_blocks")
            ));
        }
        (Visible::None, None) | (Visible::None, Some(_)) | (Visible::All, _) => {}
        _ => unreachable!(),
    }
    match visible(job, target) {
        Visible::All => Ok(()),
        other => Err(format!("after the push again the target shows {other:?}")),
    }
}

/// SIGKILL of the receiving agent at a random moment of the mixed job.
pub fn receiver_kills(ctx: &mut Ctx) -> Row {
    let mut row = Row::new("receiver killed during a mixed job (200 MiB + 300 files)");
    let src = mixed_source(&ctx.work, ctx.scale);
    let job = Job::of_folder(&src);
    let mut host = Host::new(
        &ctx.work.join("kills"),
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    let target = host.dir.join("in");
    std::fs::create_dir_all(&target).unwrap();
    let what = src.to_str().unwrap().to_string();
    host.start(None);
    let full = calibrate(&mut host, &what, &target, 2);
    let mut landed = Landed::default();
    for _ in 0..ctx.count(100) {
        clear(&target);
        if !host.running() {
            host.start(None);
        }
        let push = host.push("ops", &[&what], "in", &[]);
        std::thread::sleep(Duration::from_secs_f64(ctx.rng.random_range(0.0..full * 1.1)));
        host.kill();
        push.kill();
        let held = settled(&job, &target);
        host.start(None);
        landed.count(&mut host, &job, &target);
        row.record(after_restart(&mut host, &job, &what, &target, Some(held)));
    }
    row.note(format!(
        "a complete push took {full:.2} s; kills uniform over 0-{:.2} s",
        full * 1.1
    ));
    row.note(landed.note());
    row
}

/// SIGKILL of the agent while its `move` hook places 20,000 files, into a target that
/// has the job's top-level folder (files renamed one by one) or lacks it (one rename).
pub fn hook_kills(ctx: &mut Ctx, existing: bool) -> Row {
    let kind = if existing { "an existing" } else { "a fresh" };
    let mut row = Row::new(&format!(
        "agent killed in the import hook of 20,000 files, {kind} folder"
    ));
    let src = w3_source(&ctx.work);
    let job = Job::of_folder(&src);
    let mut host = Host::new(
        &ctx.work.join("hook"),
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    let target = host.dir.join("in");
    let what = src.to_str().unwrap().to_string();
    let reset = |target: &Path| {
        clear(target);
        if existing {
            write(&target.join("w3/keep"), b"kept");
        }
    };
    // How long the hand-over takes: from "staged files synced" until its outcome is
    // recorded (after the sender's answer).
    let mut spans = vec![];
    for _ in 0..2 {
        reset(&target);
        host.start(None);
        let push = host.push("ops", &[&what], "in", &[]);
        let a = host.agent().wait_line("staged files synced", Duration::from_secs(120));
        let b = host.agent().wait_line("outcome recorded", Duration::from_secs(120));
        let r = push.wait();
        assert_eq!(r.code, 0, "{}", r.stderr);
        spans.push((b.unwrap() - a.unwrap()).as_secs_f64());
    }
    let hook = spans.iter().copied().fold(0.0, f64::max);
    let mut landed = Landed::default();
    for _ in 0..ctx.count(50) {
        reset(&target);
        host.start(None);
        let push = host.push("ops", &[&what], "in", &[]);
        if host
            .agent()
            .wait_line("staged files synced", Duration::from_secs(120))
            .is_none()
        {
            push.kill();
            row.record(Err("the job never reached its hook".into()));
            continue;
        }
        std::thread::sleep(Duration::from_secs_f64(ctx.rng.random_range(0.0..hook * 1.2)));
        host.kill();
        push.kill();
        host.start(None);
        landed.count(&mut host, &job, &target);
        let mut result = after_restart(&mut host, &job, &what, &target, None);
        if existing && std::fs::read(target.join("w3/keep")).ok().as_deref() != Some(b"kept") {
            result = Err("the target's own file was lost".into());
        }
        row.record(result);
    }
    row.note(format!(
        "the hand-over took up to {:.0} ms; kills uniform over 0-{:.0} ms after the files were synced",
        hook * 1e3,
        hook * 1.2e3
    ));
    row.note(landed.note());
    row
}

/// SIGKILL of the sender at a random moment; the same push again takes over the
/// orphaned job at once.
pub fn sender_kills(ctx: &mut Ctx) -> Row {
    let mut row = Row::new("sender killed during a mixed job");
    let src = mixed_source(&ctx.work, ctx.scale);
    let job = Job::of_folder(&src);
    let mut host = Host::new(
        &ctx.work.join("sender"),
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    let target = host.dir.join("in");
    std::fs::create_dir_all(&target).unwrap();
    let what = src.to_str().unwrap().to_string();
    host.start(None);
    let full = calibrate(&mut host, &what, &target, 2);
    let mut slowest: f64 = 0.0;
    for _ in 0..ctx.count(50) {
        clear(&target);
        let push = host.push("ops", &[&what], "in", &[]);
        std::thread::sleep(Duration::from_secs_f64(ctx.rng.random_range(0.0..full * 1.1)));
        push.kill();
        let shown = visible(&job, &target);
        let at_least = verified_staged(&job, &target);
        let result = match shown {
            Visible::None | Visible::All => {
                let again = host.push("ops", &[&what], "in", &[]).wait();
                slowest = slowest.max(again.secs);
                check_again(&job, &target, &again, &shown, at_least)
            }
            other => Err(format!("after the sender died the target shows {other:?}")),
        };
        row.record(result);
    }
    row.note(format!(
        "a complete push took {full:.2} s; the slowest push again {slowest:.2} s"
    ));
    row
}

fn check_again(
    job: &Job,
    target: &Path,
    r: &crate::host::Pushed,
    before: &Visible,
    at_least: u64,
) -> Result<(), String> {
    if r.code != 0 {
        return Err(format!("push again: exit {}: {}", r.code, r.stderr.trim()));
    }
    if *before == Visible::None && r.num("held_blocks") < at_least {
        return Err(format!(
            "push again held {} blocks, {at_least} were staged",
            r.num("held_blocks")
        ));
    }
    if r.num("held_blocks") + r.num("sent_blocks") != job.blocks() {
        return Err(format!("held + sent != {} blocks: {:?}", job.blocks(), r.json));
    }
    match visible(job, target) {
        Visible::All => Ok(()),
        other => Err(format!("after the push again the target shows {other:?}")),
    }
}

/// Death at a failpoint between renames of a `move` into an existing folder, and of a
/// `replace` (half of those with a name taken before the restart, so the commit must be
/// undone): the target ends old or new, never a mix.
pub fn failpoints(ctx: &mut Ctx) -> Row {
    let mut row = Row::new("died at a failpoint inside the hand-over (move, replace)");
    let mut host = Host::new(
        &ctx.work.join("failpoint"),
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n[[import]]\nname = \"idx\"\npath = \"idx\"\nallow = [\"ops\"]\nhook = \"replace\"\n",
    );
    let (target, idx) = (host.dir.join("in"), host.dir.join("idx"));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&idx).unwrap();
    let src = host.dir.join("src/w");
    for i in 0..200u64 {
        write(&src.join(format!("f{i:03}")), &content(7000 + i, 512));
    }
    let job = Job::of_folder(&src);
    let version = |v: u64, dir: &Path| {
        for i in 0..50u64 {
            write(&dir.join(format!("ns/i{i:03}")), &content(v * 1000 + i, 4096));
        }
    };
    let v2 = host.dir.join("src/v2");
    version(2, &v2);
    let n = ctx.count(25);
    for _ in 0..n {
        clear(&target);
        write(&target.join("w/keep"), b"kept");
        let at = ctx.rng.random_range(1..=200);
        row.record(move_failpoint(&mut host, &job, src.to_str().unwrap(), at));
    }
    for t in 0..n {
        clear(&idx);
        version(1, &idx);
        let at = ctx.rng.random_range(1..50);
        let conflict = t % 2 == 1;
        row.record(replace_failpoint(&mut host, &v2, at, conflict));
    }
    row
}

fn move_failpoint(host: &mut Host, job: &Job, what: &str, at: u32) -> Result<(), String> {
    let target = host.dir.join("in");
    host.start(Some(&format!("commit-rename:{at}")));
    let push = host.push("ops", &[what], "in", &[]);
    let died = host.agent().wait_exit(Duration::from_secs(60));
    push.kill();
    if !died {
        return Err(format!("the agent never reached commit-rename:{at}"));
    }
    host.start(None);
    let r = after_restart(host, job, what, &target, None);
    match std::fs::read(target.join("w/keep")) {
        Ok(k) if k == b"kept" => r,
        _ => Err("the target's own file was lost".into()),
    }
}

fn replace_failpoint(host: &mut Host, v2: &Path, at: u32, conflict: bool) -> Result<(), String> {
    let idx = host.dir.join("idx");
    host.start(Some(&format!("commit-rename:{at}")));
    let push = host.push("ops", &[v2.join("ns").to_str().unwrap()], "idx", &[]);
    let died = host.agent().wait_exit(Duration::from_secs(60));
    push.kill();
    if !died {
        return Err(format!("the agent never reached commit-rename:{at}"));
    }
    if conflict {
        std::fs::remove_file(idx.join("ns/i049")).map_err(|e| e.to_string())?;
        std::fs::create_dir(idx.join("ns/i049")).map_err(|e| e.to_string())?;
    }
    host.start(None);
    let names: Vec<String> = (0..49).map(|i| format!("ns/i{i:03}")).collect();
    let now: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(idx.join(n)).unwrap_or_default())
        .collect();
    let old: Vec<Vec<u8>> = (0..49u64).map(|i| content(1000 + i, 4096)).collect();
    let new: Vec<Vec<u8>> = (0..49u64).map(|i| content(2000 + i, 4096)).collect();
    match (conflict, now == old, now == new) {
        (true, true, _) => Ok(()),
        (false, _, true) if std::fs::read(idx.join("ns/i049")).ok() == Some(content(2049, 4096)) => Ok(()),
        (c, o, n) => Err(format!(
            "replace after restart (name taken: {c}): all old {o}, all new {n}; files {:?}",
            list(&idx).len()
        )),
    }
}
