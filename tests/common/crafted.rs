//! Offers made by hand and sent with the library's sender, for tests of what an agent
//! does with offers no honest `barge push` would make.

use super::Env;
use barge::proto::blocks::FileHashes;
use barge::proto::wire::{Offer, OfferFile};
use barge::store::disk::Disk;
use barge::transfer::{self, Flow, TransferError};
use std::path::PathBuf;

/// An offer into `in` of `names`, each file holding `data`.
pub fn offer_for(names: &[&str], data: &[u8]) -> Offer {
    let hashes = FileHashes::from_reader(data, data.len() as u64).unwrap();
    let files = names
        .iter()
        .map(|n| OfferFile {
            path: n.to_string(),
            hashes: hashes.clone(),
            keys: None,
            mode: 0o644,
        })
        .collect();
    Offer {
        target: "in".into(),
        files,
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    }
}

/// Sends `offer` as `client`, every file's data read from `source` (which may be
/// missing: then the agent refuses before any data is read).
pub async fn send_offer(env: &Env, offer: Offer, source: PathBuf) -> Result<transfer::SendReport, TransferError> {
    let conn = env.client("client").connect(&env.peer()).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let stamp = barge::store::hashcache::FileStamp::now(&source).unwrap_or(barge::store::hashcache::FileStamp {
        dev: 0,
        ino: 0,
        size: 0,
        mtime_ns: 0,
    });
    let sources: Vec<_> = offer
        .files
        .iter()
        .map(|f| barge::store::source::SourceFile {
            // A name the agent must refuse is no RelPath: the source's own name is not sent.
            name: barge::proto::path::RelPath::new(&f.path)
                .unwrap_or_else(|_| barge::proto::path::RelPath::new("x").unwrap()),
            path: source.clone(),
            size: f.hashes.size,
            stamp,
            within: None,
            mode: 0o644,
        })
        .collect();
    let disk = Disk::start().unwrap();
    let conns = std::slice::from_ref(&conn);
    transfer::send_job(conns, &mut send, &mut recv, offer, sources, &disk, &Flow::default()).await
}
