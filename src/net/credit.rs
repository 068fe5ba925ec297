//! Data streams an agent lets its connections open, shared agent-wide, so that memory
//! stays bounded however many jobs run.
//!
//! What a push holds in the agent's memory grows with its open data streams: quinn
//! buffers up to a stream's receive window (1.2 MB, up to 2.4 MB on a long path) of
//! what the sender sent, the stream's reader gathers the block it is on (1 MiB) and has
//! up to 1 MiB more being written. 64 jobs of 8 streams each took the agent past 590 MiB resident. Sharing out
//! receive windows and a budget for blocks instead did not work: a stream that held
//! budget for a half-read block waited for bytes its connection had no credit left to
//! carry, credit held by streams that waited for budget, and the agent stalled. A
//! stream that is not open holds nothing. So the agent hands out stream credit:
//! [`Credit::for_memory`] turns `[limits] memory_mib` into a number of data streams
//! open at once, agent-wide. Connections that carry data share them evenly (at most 8
//! each, a job's most), and a connection without data streams may open one, so a new
//! job starts at once. A sender at its connection's limit waits in `open_uni` until one
//! of its streams ends (quinn's MAX_STREAMS frame lets it go on); fewer streams per job
//! only matter when many jobs share the agent, and then the disk is the limit anyway.

use crate::proto::limits::MAX_STREAMS;
use std::collections::HashMap;
use std::sync::Mutex;

/// Data streams a connection may open while it carries none.
pub const MIN_STREAMS: u32 = 1;

/// Memory one open data stream may hold in the agent, given its receive window in
/// quinn: that window, the block being read and the writes it has under way.
pub fn per_stream(window: u64) -> u64 {
    window + (2 << 20)
}

/// The agent's connections and the data streams each may open.
#[derive(Debug)]
pub struct Credit {
    total: u32,
    conns: Mutex<HashMap<usize, Entry>>,
}

#[derive(Debug)]
struct Entry {
    conn: Option<quinn::Connection>,
    streams: usize,
    limit: u32,
}

impl Credit {
    /// As many streams of receive window `window` agent-wide as `bytes` of memory hold
    /// (at least one job's 8).
    pub fn for_memory(bytes: u64, window: u64) -> Credit {
        Credit::new((bytes / per_stream(window)).max(MAX_STREAMS as u64) as u32)
    }

    /// Credit for `total` data streams at once, agent-wide.
    pub fn new(total: u32) -> Credit {
        Credit {
            total,
            conns: Mutex::default(),
        }
    }

    /// Data streams open at once, agent-wide, when every connection is busy.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// A new connection: it may open [`MIN_STREAMS`] until it carries data.
    pub fn add(&self, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().expect("stream credit");
        conns.insert(conn.stable_id(), Entry::new(Some(conn.clone())));
        self.share(&mut conns);
    }

    /// A connection (by its `stable_id`) closed: its share goes to the others.
    pub fn remove(&self, id: usize) {
        let mut conns = self.conns.lock().expect("stream credit");
        conns.remove(&id);
        self.share(&mut conns);
    }

    /// A data stream was accepted (`true`) or has ended on connection `id`.
    pub fn stream(&self, id: usize, started: bool) {
        let mut conns = self.conns.lock().expect("stream credit");
        let Some(e) = conns.get_mut(&id) else { return };
        let was_busy = e.streams > 0;
        match started {
            true => e.streams += 1,
            false => e.streams = e.streams.saturating_sub(1),
        }
        if was_busy != (e.streams > 0) {
            self.share(&mut conns);
        }
    }

    /// Busy connections get an even share, idle ones [`MIN_STREAMS`].
    fn share(&self, conns: &mut HashMap<usize, Entry>) {
        let busy = conns.values().filter(|e| e.streams > 0).count().max(1) as u32;
        let share = (self.total / busy).clamp(MIN_STREAMS, MAX_STREAMS as u32);
        for e in conns.values_mut() {
            let want = if e.streams > 0 { share } else { MIN_STREAMS };
            if want != e.limit {
                e.limit = want;
                if let Some(c) = &e.conn {
                    c.set_max_concurrent_uni_streams(want.into());
                }
            }
        }
    }

    /// The data streams connection `id` may have open now.
    pub fn limit(&self, id: usize) -> Option<u32> {
        self.conns.lock().expect("stream credit").get(&id).map(|e| e.limit)
    }
}

impl Entry {
    fn new(conn: Option<quinn::Connection>) -> Entry {
        Entry {
            conn,
            streams: 0,
            limit: MIN_STREAMS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credit_with(total: u32, ids: &[usize]) -> Credit {
        let c = Credit::new(total);
        let mut conns = c.conns.lock().unwrap();
        for id in ids {
            conns.insert(*id, Entry::new(None));
        }
        drop(conns);
        c
    }

    #[test]
    fn busy_connections_share_the_total_and_idle_ones_may_open_one() {
        let c = credit_with(32, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(c.limit(1), Some(MIN_STREAMS));
        c.stream(1, true);
        assert_eq!(c.limit(1), Some(8), "alone: a job's 8 streams");
        assert_eq!(c.limit(2), Some(MIN_STREAMS), "idle: one, to start a job");
        for id in 2..=8 {
            c.stream(id, true);
        }
        assert_eq!(c.limit(1), Some(4), "eight busy connections share 32");
        c.stream(1, true);
        c.stream(1, false);
        assert_eq!(c.limit(1), Some(4), "still busy with one stream");
        c.stream(1, false);
        assert_eq!(c.limit(1), Some(MIN_STREAMS));
        assert_eq!(c.limit(2), Some(4), "32 / 7, rounded down");
        c.remove(2);
        assert_eq!(c.limit(2), None);
    }

    #[test]
    fn many_busy_connections_get_one_stream_each_and_memory_sets_the_total() {
        let ids: Vec<usize> = (0..200).collect();
        let c = credit_with(60, &ids);
        ids.iter().for_each(|id| c.stream(*id, true));
        assert_eq!(c.limit(0), Some(1));
        let window = crate::net::quic::STREAM_WINDOW;
        assert_eq!(Credit::for_memory(192 << 20, window).total(), 60);
        let long = crate::net::quic::MAX_STREAM_WINDOW;
        assert_eq!(
            Credit::for_memory(192 << 20, long).total(),
            44,
            "wider windows, fewer streams"
        );
        assert_eq!(
            Credit::for_memory(1 << 20, window).total(),
            8,
            "never fewer than one job's streams"
        );
    }
}
