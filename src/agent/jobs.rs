//! The agent's registry of jobs: which job ids run and for whom, how many jobs run
//! against `max_jobs`, the jobs being received (so their data lanes find them), and the
//! held ones. Guards given out here hand back what they took when dropped.

use super::*;

/// Every job the agent knows of, in one place.
pub(super) struct Jobs {
    /// Job ids being received or committed, and who sends each.
    active: Mutex<HashMap<JobId, String>>,
    /// Jobs running (pushes and pulls), against `max_jobs`.
    running: AtomicUsize,
    /// Jobs being received, from all connections (their data lanes find them here).
    pub(super) receiving: JobTable,
    /// Held jobs and the targets they claim.
    pub(super) held: Holds,
}

impl Jobs {
    pub(super) fn new(held: Holds) -> Jobs {
        Jobs {
            active: Mutex::default(),
            running: AtomicUsize::new(0),
            receiving: JobTable::default(),
            held,
        }
    }

    /// Jobs running now (pushes and pulls).
    pub(super) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Jobs in flight and held, and bytes staged, for metrics and admission.
    pub(super) fn gauges(&self, draining: bool) -> Gauges {
        let table = self.receiving.lock().expect("job table");
        let receiving: u64 = table
            .values()
            .map(|inc| inc.offer.total_bytes() - inc.missing_bytes())
            .sum();
        let held = self.held.list();
        Gauges {
            jobs_receiving: table.len() as u64,
            jobs_held: held.len() as u64,
            bytes_staged: receiving + held.iter().map(|h| h.offer.total_bytes()).sum::<u64>(),
            draining,
            ..Default::default()
        }
    }

    /// Bytes that jobs being received and held jobs may stage, in full: all of them,
    /// or those of one peer.
    pub(super) fn staging_committed(&self, peer: Option<&str>) -> u64 {
        let of = |p: &str| peer.is_none_or(|peer| peer == p);
        let table = self.receiving.lock().expect("job table");
        let receiving: u64 = table
            .values()
            .filter(|inc| of(&inc.peer))
            .map(|inc| inc.offer.total_bytes())
            .sum();
        let held = self.held.list().into_iter().filter(|h| of(&h.peer));
        receiving + held.map(|h| h.offer.total_bytes()).sum::<u64>()
    }
}

/// How long a refused sender should wait before trying again.
pub(super) const RETRY_BUSY: u32 = transfer::RETRY_BUSY;
const RETRY_DRAIN: u32 = 30;

/// One of the agent's `max_jobs` job slots, and of its peer's share of them, given
/// back on drop. None are given out while the agent drains for shutdown.
pub(super) struct JobSlot<'a>(&'a Shared, #[allow(dead_code)] gate::Taken);

impl<'a> JobSlot<'a> {
    pub(super) fn claim(shared: &'a Shared, live: &Live, peer: &str) -> Result<Self, Refusal> {
        if shared.draining.load(Ordering::SeqCst) {
            return Err(refuse(code::BUSY, "agent is shutting down").retry_after(RETRY_DRAIN));
        }
        let max_jobs = live.config.max_jobs;
        if shared.jobs.running.fetch_add(1, Ordering::SeqCst) >= max_jobs {
            shared.jobs.running.fetch_sub(1, Ordering::SeqCst);
            let why = format!("agent is at its limit of {max_jobs} jobs");
            return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
        }
        let per = live.config.limits.identity.jobs;
        let mine = shared.peers.take(peer, gate::Kind::Jobs, 1, per as u64).map_err(|_| {
            shared.jobs.running.fetch_sub(1, Ordering::SeqCst);
            let why = format!("{peer} has {per} jobs running, its limit");
            refuse(code::BUSY, why).retry_after(RETRY_BUSY)
        })?;
        Ok(JobSlot(shared, mine))
    }
}

impl Drop for JobSlot<'_> {
    fn drop(&mut self) {
        self.0.jobs.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees a target claimed by a `hold` job that did not get as far as being held.
pub(super) struct ClaimGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) target: Option<(String, JobId)>,
}

impl<'a> ClaimGuard<'a> {
    pub(super) fn none(shared: &'a Shared) -> Self {
        ClaimGuard { shared, target: None }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some((target, id)) = &self.target {
            if !self.shared.jobs.held.staged_names().contains(&id.to_string()) {
                self.shared.jobs.held.release(target, *id);
            }
        }
    }
}

/// Marks a job id as running (being received or committed), and by whom.
pub(super) struct ActiveGuard<'a> {
    shared: &'a Shared,
    id: JobId,
}

/// How long a sender's new attempt waits for its orphaned earlier one to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl<'a> ActiveGuard<'a> {
    /// Claims `id` for `peer`, or says who has it.
    pub(super) fn try_claim(shared: &'a Shared, id: JobId, peer: &str) -> Result<Self, Option<String>> {
        let mut active = shared.jobs.active.lock().expect("active jobs");
        match active.get(&id) {
            None => {
                active.insert(id, peer.to_string());
                Ok(ActiveGuard { shared, id })
            }
            Some(holder) => Err(Some(holder.clone()).filter(|h| h != peer)),
        }
    }

    /// Claims `id` for `peer`. If the same sender's earlier attempt still has it (a
    /// sender that died or gave up leaves its job waiting until the connection times
    /// out), that attempt is failed and this one takes over once it has let go: its
    /// verified blocks stay staged and count for this one. Another sender is refused.
    pub(super) async fn take_over(shared: &'a Shared, id: JobId, peer: &str) -> Result<Self, Refusal> {
        let until = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            match ActiveGuard::try_claim(shared, id, peer) {
                Ok(g) => return Ok(g),
                Err(Some(_)) => {
                    let why = format!("job {id} is being sent by another sender");
                    return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
                }
                Err(None) => {}
            }
            let earlier = shared.jobs.receiving.lock().expect("job table").get(&id).cloned();
            if let Some(inc) = earlier {
                if inc.take_over() {
                    info!("taking over the same sender's earlier attempt at this job");
                }
            }
            if tokio::time::Instant::now() >= until {
                let why = format!("job {id} is still finishing an earlier attempt of the same sender");
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.shared.jobs.active.lock().expect("active jobs").remove(&self.id);
    }
}
