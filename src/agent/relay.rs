//! The agent as a relay and as a sender of its own: forwarding a job it receives to the
//! replicas after it (see [`crate::client::chain`]), with its own identity and client.

use super::*;
use crate::client::{Client, PushOptions};
use crate::transfer::relay::Tap;
use crate::transfer::{Blocks, Relay};

impl Shared {
    /// The agent's own client (its identity, its transport settings), made when first
    /// needed: relays and ships send with it.
    pub(super) fn own_client(&self) -> Result<Arc<Client>, Refusal> {
        let mut slot = self.client.lock().expect("own client");
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = self.config();
        let client = Client::with_material(&self.tls().material, &config.tuning).map_err(|e| e.refusal())?;
        Ok(slot.insert(Arc::new(client)).clone())
    }
}

impl JobCtx {
    /// Refuses an offer that names replicas after this one unless the target relays for
    /// this sender (`relay_from`): a relay sends with the agent's own identity.
    pub(super) fn check_relay(&self, target: &Import, offer: &Offer) -> Result<(), Refusal> {
        if offer.relay.is_empty() || target.relay_from.allows(&self.peer) {
            return Ok(());
        }
        let why = format!(
            "import target {:?} does not relay for {}: it is not in the target's relay_from",
            target.name, self.peer
        );
        Err(refuse(code::NOT_ALLOWED, why))
    }

    /// Starts forwarding `job` (as its sender offered it) to the replicas its offer
    /// names: each block as soon as it is verified and written here.
    pub(super) fn start_relay(
        &self,
        offered: &Offer,
        job: &ReceiveJob,
        stage: &Stage,
        target: &Import,
    ) -> Result<Option<Relay>, Refusal> {
        if offered.relay.is_empty() {
            return Ok(None);
        }
        let tap = Arc::new(Tap::new(job, stage, &target.path).map_err(transfer::codes::io_refusal)?);
        let client = self.shared.own_client()?;
        let mut base = offered.clone();
        let hops = std::mem::take(&mut base.relay);
        // The next hop is sent what arrives as it arrives: QUIC streams, no TCP lane.
        base.tcp_lane = false;
        let opts = PushOptions {
            hold: offered.hold,
            ..Default::default()
        };
        let blocks = Blocks::Relayed(tap.clone());
        let span = info_span!("relay", hops = hops.len(), next = %hops[0].peer);
        let counted = tap.clone();
        let task = async move {
            // However the forwarding ends (even cut off), the tap keeps nothing more.
            let _closing = Closing(counted.clone());
            let report = client.deliver(hops, base, blocks, &opts, Arc::default()).await;
            let memory = counted.from_memory.load(Ordering::Relaxed);
            let disk = counted.from_disk.load(Ordering::Relaxed);
            info!(
                blocks_from_memory = memory,
                blocks_read_back = disk,
                bytes = report.bytes_sent,
                "relayed"
            );
            report.replicas
        };
        let done = tokio::spawn(task.instrument(span));
        Ok(Some(Relay {
            tap,
            done: Mutex::new(Some(done)),
        }))
    }
}

/// Closes a relay's tap when its forwarding task ends, however it ends.
struct Closing(Arc<Tap>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}
