//! A third-party ship: an operator asks this agent to send an export's files to other
//! agents' import targets. The data goes from here to there with this agent's identity
//! and never through the operator; the export's `ship` list says who may ask.
//!
//! A ship runs on its own: an operator that disconnects does not stop it, `barge
//! status` lists it, and the same ship asked for again while it runs attaches to it
//! instead of starting a second copy.

use super::*;
use crate::client::PushOptions;
use crate::proto::wire::{Hop, ReplicaResult, Ship};
use crate::transfer::Blocks;
use std::sync::atomic::AtomicU64;
use tokio::sync::watch;

/// Ships running now, by what they send where.
#[derive(Default)]
pub(super) struct Ships(Mutex<HashMap<String, Arc<ShipRun>>>);

/// One running ship.
pub(super) struct ShipRun {
    pub(super) export: String,
    pub(super) offer: Offer,
    pub(super) to: Vec<Hop>,
    pub(super) operator: String,
    pub(super) started: std::time::Instant,
    pub(super) sent: Arc<AtomicU64>,
    /// How it ended on each replica, once it has.
    done: watch::Receiver<Option<Vec<ReplicaResult>>>,
}

impl Ships {
    pub(super) fn list(&self) -> Vec<Arc<ShipRun>> {
        self.0.lock().expect("ships").values().cloned().collect()
    }
}

/// How often an operator hears of a ship's progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl JobCtx {
    /// An operator's ship: checks it may, starts it (or finds it running), and tells
    /// the operator how it goes until it ends or the operator goes away.
    pub(super) async fn ship(&self, ship: Ship, send: &mut quinn::SendStream) -> Result<(), Refusal> {
        let live = self.shared.live();
        let ex = live.config.export(&ship.export).filter(|e| e.ship.allows(&self.peer));
        let Some(ex) = ex.cloned() else {
            let why = format!(
                "{} may not order ships from export {:?} (it is not in the export's ship list)",
                self.peer, ship.export
            );
            return Err(refuse(code::NOT_ALLOWED, why));
        };
        if ship.to.is_empty() {
            return Err(refuse(code::BAD_MESSAGE, "a ship names no replica"));
        }
        let run = self.ship_run(&ex, ship).await?;
        let total = run.offer.total_bytes();
        let mut done = run.done.clone();
        loop {
            let said = Message::Progress {
                done: run.sent.load(Ordering::Relaxed),
                total,
            };
            if transfer::write_msg(send, &said).await.is_err() {
                info!(export = %run.export, "the operator went away; the ship goes on");
                return Ok(());
            }
            let ended = done.borrow().clone();
            if let Some(results) = ended {
                let _ = transfer::write_msg(send, &Message::Replicas(results.clone())).await;
                let _ = transfer::write_msg(send, &ship_answer(&results)).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(transfer::REPLY_GRACE, send.stopped()).await;
                return Ok(());
            }
            let _ = tokio::time::timeout(PROGRESS_EVERY, done.changed()).await;
        }
    }

    /// The run of `ship`: the one under way, or a new one.
    async fn ship_run(&self, ex: &Export, ship: Ship) -> Result<Arc<ShipRun>, Refusal> {
        let (list, mut offer) = self.export_offer(ex, &ship.files, ship.range.as_ref()).await?;
        offer.hold = ship.hold;
        let key = ship_key(&ex.name, &offer, &ship.to);
        let mut ships = self.shared.ships.0.lock().expect("ships");
        if let Some(run) = ships.get(&key) {
            info!(export = %ex.name, "the same ship runs already: attached to it");
            return Ok(run.clone());
        }
        let client = self.shared.own_client()?;
        let (tx, rx) = watch::channel(None);
        let run = Arc::new(ShipRun {
            export: ex.name.clone(),
            offer: offer.clone(),
            to: ship.to.clone(),
            operator: self.peer.clone(),
            started: std::time::Instant::now(),
            sent: Arc::default(),
            done: rx,
        });
        ships.insert(key.clone(), run.clone());
        let (shared, sent, hops) = (self.shared.clone(), run.sent.clone(), ship.to);
        let opts = PushOptions {
            hold: ship.hold,
            hop_lanes: hop_lanes(ex, &hops),
            ..Default::default()
        };
        let span = info_span!("ship", export = %ex.name, operator = %self.peer, replicas = hops.len());
        let task = async move {
            let report = client.deliver(hops, offer, Blocks::Files(list), &opts, sent).await;
            let delivered = report.all_delivered();
            info!(delivered, bytes = report.bytes_sent, "ship done");
            shared.ships.0.lock().expect("ships").remove(&key);
            let _ = tx.send(Some(report.replicas));
        };
        tokio::spawn(task.instrument(span));
        Ok(run)
    }
}

/// The TCP lane the export allows each replica (by its certificate name), for the
/// replicas this agent sends to itself.
fn hop_lanes(ex: &Export, hops: &[Hop]) -> std::collections::BTreeMap<String, LaneKind> {
    let name = |h: &Hop| h.peer.parse::<crate::client::Peer>().ok().map(|p| p.name);
    let lane = |n: String| ex.lane_for(&n).map(|k| (n, k));
    hops.iter().filter_map(name).filter_map(lane).collect()
}

/// What identifies a ship: the export, the job it sends (names, roots, metadata),
/// whether it holds, and where.
fn ship_key(export: &str, offer: &Offer, to: &[Hop]) -> String {
    let hops: Vec<String> = to.iter().map(|h| format!("{}={}", h.peer, h.target)).collect();
    format!("{export}/{}/{}/{}", offer.job_id(), offer.hold, hops.join(","))
}

/// The operator's last word: committed if every replica has the job, else which failed.
fn ship_answer(results: &[ReplicaResult]) -> Message {
    match crate::client::replicas_failed(results) {
        None => Message::Committed {
            report: format!("shipped to {} replicas", results.len()),
        },
        Some(why) => Message::Failed(why),
    }
}
