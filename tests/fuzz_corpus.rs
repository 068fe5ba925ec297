//! Replays the committed fuzz corpus, and the inputs of past findings, through the fuzz
//! targets: the same `fuzz/targets/` code the fuzz binaries run, so an input that once
//! crashed stays fixed. `fuzz/README.md` tells how to fuzz; `examples/fuzz_seeds.rs`
//! writes the seeds.

#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files in `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs every corpus and regression file of target `name`; fails naming those that panic.
fn replay(name: &str) {
    let (_, run) = targets::ALL.iter().find(|(n, _)| *n == name).expect("a target");
    let corpus = files(&fuzz_dir().join("corpus").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    let failed: Vec<PathBuf> = corpus
        .into_iter()
        .chain(regressions)
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| run(&data)).is_err()
        })
        .collect();
    assert!(failed.is_empty(), "{name}: {} inputs panic: {failed:#?}", failed.len());
}

#[test]
fn wire_corpus() {
    replay("wire");
}

#[test]
fn offer_corpus() {
    replay("offer");
}

#[test]
fn accept_corpus() {
    replay("accept");
}

#[test]
fn hashcache_corpus() {
    replay("hashcache");
}

#[test]
fn sst_corpus() {
    replay("sst");
}

#[test]
fn every_target_has_a_binary_and_a_test_and_every_folder_a_target() {
    let source = include_str!("fuzz_corpus.rs");
    for (name, _) in targets::ALL {
        assert!(fuzz_dir().join(format!("fuzz_targets/{name}.rs")).is_file(), "{name}");
        assert!(
            source.contains(&format!("replay(\"{name}\")")),
            "no replay test for {name}"
        );
    }
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(folder)) else {
            continue;
        };
        for entry in entries.map(Result::unwrap).filter(|e| e.path().is_dir()) {
            let dir = entry.file_name();
            let known = targets::ALL.iter().any(|(name, _)| dir.to_str() == Some(name));
            assert!(known, "fuzz/{folder}/{dir:?} is no target's");
        }
    }
}
