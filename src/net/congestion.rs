//! BBR with a bound learned from loss: quinn's BBR, plus a cap on bytes in flight that
//! a round trip with heavy loss sets and clean round trips lift again.
//!
//! quinn's BBR sizes its window from the bandwidth it measures and nothing in it listens
//! to loss, and quinn's pacer sends at 1.25 x window / RTT, so the window is also the
//! rate. Over an emulated 1 Gbit/s, 20 ms link whose queue holds one bandwidth-delay
//! product it kept several times that in flight and lost 9-14 % of its packets to the
//! queue, at about the speed of TCP: everything else on such a link would suffer. The
//! bound here is the missing piece, in the spirit of BBRv2's `inflight_hi`:
//!
//! - a round trip that loses more than 2 % of its bytes, and at least 8 packets, while
//!   the path shows a standing queue (even the round trip's fastest packet took a quarter
//!   longer than the path's minimum, and at least 2 ms more), caps the window at 80 % of
//!   what that round trip delivered (the path's pipe and queue);
//! - without a standing queue, loss is the path's own (a lossy radio or WAN hop, not a
//!   full queue) and sets no cap, unless it is so heavy (over 15 % of a round trip) that
//!   only a policer or a collapsing path explains it;
//! - losses of packets sent before that cut do not cut again (one cut per overflow, as
//!   in TCP's recovery);
//! - after 32 clean round trips (or 640 ms, if that is fewer, at least 4) the cap rises
//!   by a step that doubles each round trip up to an eighth of the cap, so a path that
//!   got faster is found again and a long clean stretch lifts the cap out of BBR's way;
//! - random loss under 2 % never sets it, queue or not. The 8 packets keep it so in
//!   small round trips too: one random loss among 16 packets is 6 %, and a cap cut from
//!   such a round sits at its floor, where the next stray loss cuts it again.
//!
//! BBRv2 and v3 also keep a loss threshold per round trip (2 %), but count any loss
//! above it; on a path that drops 2-5 % at random that holds them far below the link
//! rate, which is the case barge is for (long, lossy links). The queue test here tells
//! the two apart: a queue that overflows is full, so every packet of that round trip
//! waited in it.
//!
//! On that link it lost 1.0-1.8 % of its packets at the same speed (`benches/link.sh`).
//!
//! [`Bounded`] also moves quinn's first ProbeRTT out of the way. quinn's BBR (0.11) has
//! no record of a ProbeRTT until its first one, so it deems its min RTT expired and enters
//! ProbeRTT at the first acknowledgement that is not app-limited: the moment data starts
//! to flow. For 200 ms and a round trip it then keeps in flight 3/4 of the
//! bandwidth-delay product its first, tiny samples imply. On the 20 ms link that held
//! every push at about 18 packets per round trip for ~230 ms, 10 % of a 256 MiB push.
//! [`Bounded`] lets that first ProbeRTT happen on the connection's first
//! acknowledgement, dated far enough back that it is already over; the next comes 10 s
//! later, as BBR intends.
//!
//! [`LossBound`] is the loss bookkeeping, free of quinn and tested on its own; [`Bounded`]
//! puts it over the inner controller.

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A round trip losing more than 1 / LOSS_DIVISOR of its bytes (2 %) sets the cap.
const LOSS_DIVISOR: u64 = 50;
/// The cap after a lossy round trip, in percent of what that round trip delivered.
const CUT_PERCENT: u64 = 80;
/// The cap never goes below this many packets.
const MIN_PACKETS: u64 = 16;
/// A round trip must lose at least this many packets to set the cap.
const MIN_LOST_PACKETS: u64 = 8;
/// A round trip losing more than this share of its bytes (percent) sets the cap
/// even without a standing queue.
const HEAVY_PERCENT: u64 = 15;
/// A standing queue: the round trip's fastest packet took this share (in quarters) of
/// the path's minimum round trip more...
const QUEUE_QUARTERS: u32 = 1;
/// ...and at least this much more (timer and scheduling noise on fast paths).
const QUEUE_MIN_EXTRA: Duration = Duration::from_millis(2);
/// Clean round trips after a cut before the cap starts to rise.
const HOLD_ROUNDS: u32 = 32;
/// ...but no longer than this, on a long path (at 100 ms, 32 round trips were most of a
/// push), and never fewer than [`MIN_HOLD_ROUNDS`].
const HOLD_TIME: Duration = Duration::from_millis(640);
/// Fewest clean round trips after a cut before the cap rises.
const MIN_HOLD_ROUNDS: u32 = 4;
/// How far back the inner BBR's first ProbeRTT is dated: more than its 200 ms length.
const PROBE_RTT_BACKDATE: Duration = Duration::from_millis(250);

/// Loss per round trip, and the in-flight cap it implies.
#[derive(Debug, Clone)]
pub struct LossBound {
    mtu: u64,
    /// Packets sent at or after this instant belong to the next round trip.
    round_start: Option<Instant>,
    acked: u64,
    lost: u64,
    max_in_flight: u64,
    cap: Option<u64>,
    step: u64,
    /// Clean round trips still to wait before raising the cap.
    hold: u32,
    /// When the cap was last cut.
    cut_at: Option<Instant>,
    /// The fastest round trip of any packet so far: the path's own delay.
    min_rtt: Option<Duration>,
    /// The fastest round trip of a packet acknowledged in this round trip.
    round_min_rtt: Option<Duration>,
}

impl LossBound {
    /// A bound with no cap yet, for packets of `mtu` bytes.
    pub fn new(mtu: u16) -> LossBound {
        LossBound {
            mtu: mtu.into(),
            round_start: None,
            acked: 0,
            lost: 0,
            max_in_flight: 0,
            cap: None,
            step: mtu.into(),
            hold: 0,
            cut_at: None,
            min_rtt: None,
            round_min_rtt: None,
        }
    }

    /// A packet sent at `sent` carrying `bytes` was acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        // The first packet sent in a new round trip closes the one before and counts in its own.
        if !matches!(self.round_start, Some(start) if sent < start) {
            self.end_round(now);
        }
        self.acked += bytes;
        let rtt = now.saturating_duration_since(sent);
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// Whether this round trip's packets all waited in a queue: even its fastest took
    /// clearly longer than the path's fastest. Without a measure, assume they did.
    fn standing_queue(&self) -> bool {
        let (Some(base), Some(round)) = (self.min_rtt, self.round_min_rtt) else {
            return true;
        };
        let extra = (base * QUEUE_QUARTERS / 4).max(QUEUE_MIN_EXTRA);
        round > base + extra
    }

    /// Round trips to hold a new cap: [`HOLD_ROUNDS`], or as many as fit [`HOLD_TIME`].
    fn hold_rounds(&self) -> u32 {
        let rtt = self.min_rtt.unwrap_or_default().max(Duration::from_micros(100));
        let fit = (HOLD_TIME.as_micros() / rtt.as_micros()).min(HOLD_ROUNDS as u128) as u32;
        fit.max(MIN_HOLD_ROUNDS)
    }

    /// Whether this round trip lost enough, in the way a queue overflow does, to cut.
    fn overflowed(&self) -> bool {
        let total = self.acked + self.lost;
        let lossy = self.lost * LOSS_DIVISOR > total && self.lost >= MIN_LOST_PACKETS * self.mtu;
        let heavy = self.lost * 100 > total * HEAVY_PERCENT;
        lossy && (heavy || self.standing_queue())
    }

    /// `bytes` were lost, the last of them sent at `sent`. Losses of packets sent before
    /// the last cut were already answered by it: they do not count again.
    pub fn on_loss(&mut self, sent: Instant, bytes: u64) {
        if self.cut_at.is_none_or(|cut| sent >= cut) {
            self.lost += bytes;
        }
    }

    /// Bytes in flight after a batch of acknowledgements.
    pub fn on_in_flight(&mut self, bytes: u64) {
        self.max_in_flight = self.max_in_flight.max(bytes);
    }

    /// The window to use given the inner controller's `window`.
    pub fn window(&self, window: u64) -> u64 {
        self.cap.map_or(window, |c| c.min(window))
    }

    /// The in-flight cap learned so far, bytes; `None` until heavy loss set one.
    pub fn cap(&self) -> Option<u64> {
        self.cap
    }

    /// The path's MTU changed to `mtu` bytes.
    pub(crate) fn on_mtu(&mut self, mtu: u16) {
        self.mtu = mtu.into();
    }

    fn end_round(&mut self, now: Instant) {
        if self.overflowed() {
            // What one round trip delivered is what the path holds (its pipe and queue);
            // more than that was in flight only while the queue overflowed.
            let seen = self.max_in_flight.min(self.acked);
            let seen = self.cap.map_or(seen, |c| c.min(seen));
            self.cap = Some((seen * CUT_PERCENT / 100).max(MIN_PACKETS * self.mtu));
            self.step = self.mtu;
            self.hold = self.hold_rounds();
            self.cut_at = Some(now);
        } else if self.hold > 0 {
            self.hold -= 1;
        } else if let Some(c) = self.cap {
            // The queue overflows a round trip before the loss shows: at most an eighth
            // more per round trip keeps that overshoot small.
            self.cap = Some(c.saturating_add(self.step));
            self.step = self.step.saturating_mul(2).min(c / 8).max(self.mtu);
        }
        // One line per round trip (what it delivered and lost, and the cap after it).
        tracing::trace!(
            acked = self.acked,
            lost = self.lost,
            in_flight = self.max_in_flight,
            cap = self.cap,
            round_min_rtt = ?self.round_min_rtt,
            "round"
        );
        self.round_start = Some(now);
        self.round_min_rtt = None;
        (self.acked, self.lost, self.max_in_flight) = (0, 0, 0);
    }
}

/// An inner controller (quinn's BBR) whose window is bounded by a [`LossBound`].
pub struct Bounded {
    inner: Box<dyn Controller>,
    bound: LossBound,
    start: Start,
}

/// Where the inner BBR is in its start (see the module docs on its first ProbeRTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing acknowledged yet.
    Fresh,
    /// The first acknowledgements are in; their batch has not ended.
    Acked,
    /// The first ProbeRTT is over.
    Done,
}

impl Controller for Bounded {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        // Until its first ProbeRTT the inner BBR takes its min RTT only from acknowledgements
        // that are not app-limited; the first ones must count, as none will after it.
        let app_limited = app_limited && self.start == Start::Done;
        if self.start == Start::Fresh {
            self.start = Start::Acked;
        }
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.bound.on_ack(now, sent, bytes);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest: Option<u64>) {
        match self.start {
            // An app-limited batch does not start a ProbeRTT.
            Start::Fresh => self.inner.on_end_acks(now, in_flight, true, largest),
            Start::Acked => {
                // The first ProbeRTT starts here, dated so that the next round trip ends it.
                let then = now.checked_sub(PROBE_RTT_BACKDATE).unwrap_or(now);
                self.inner.on_end_acks(then, in_flight, false, largest);
                self.start = Start::Done;
            }
            Start::Done => self.inner.on_end_acks(now, in_flight, app_limited, largest),
        }
        self.bound.on_in_flight(in_flight);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, persistent, lost_bytes);
        self.bound.on_loss(sent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.bound.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.bound.window(self.inner.window())
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Bounded {
            inner: self.inner.clone_box(),
            bound: self.bound.clone(),
            start: self.start,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds [`Bounded`] controllers over quinn's BBR.
#[derive(Debug, Default)]
pub struct BoundedBbr {
    bbr: Arc<quinn::congestion::BbrConfig>,
}

impl ControllerFactory for BoundedBbr {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bounded {
            inner: self.bbr.clone().build(now, current_mtu),
            bound: LossBound::new(current_mtu),
            start: Start::Fresh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MTU: u64 = 1452;
    const RTT: Duration = Duration::from_millis(20);

    /// A round trip through a full queue of one bandwidth-delay product.
    const QUEUED: Duration = Duration::from_millis(40);

    /// Plays one round trip starting at `t` through a full queue (see [`round_at`]).
    fn round(b: &mut LossBound, t: Instant, packets: u64, lost: u64, in_flight: u64) -> Instant {
        round_at(b, t, packets, lost, in_flight, QUEUED)
    }

    /// Plays one round trip whose packets are sent at `t` and take `rtt` each: `packets`
    /// are acknowledged or (`lost` of them) lost, with `in_flight` bytes outstanding; the
    /// first acknowledgement of the next round trip (sent when this one's first came
    /// back) closes it. Returns when the next round trip's packets are sent.
    fn round_at(b: &mut LossBound, t: Instant, packets: u64, lost: u64, in_flight: u64, rtt: Duration) -> Instant {
        for i in 0..packets - lost {
            b.on_ack(t + rtt + Duration::from_micros(i), t, MTU);
        }
        // Declared lost as later packets of the round trip are acknowledged.
        b.on_loss(t, lost * MTU);
        b.on_in_flight(in_flight);
        let next = t + rtt;
        // Sent in the next round trip even when this one's was shorter than the last.
        let sent = b.round_start.map_or(next, |start| start.max(next));
        b.on_ack(sent + rtt, sent, MTU);
        next
    }

    /// A bound that has seen the path's own round trip, [`RTT`].
    fn started() -> (LossBound, Instant) {
        let mut b = LossBound::new(MTU as u16);
        let t = Instant::now() + RTT;
        b.on_ack(t, t - RTT, 0);
        (b, t)
    }

    #[test]
    fn random_loss_without_a_queue_keeps_the_window() {
        for lost in [50, 100] {
            let (mut b, mut t) = started();
            for _ in 0..200 {
                t = round_at(&mut b, t, 2000, lost, 3_000_000, RTT + Duration::from_micros(500));
            }
            assert_eq!(b.cap(), None, "{} % random loss on a path with no queue", lost / 20);
        }
    }

    #[test]
    fn a_queue_overflow_cuts_then_random_loss_after_it_lets_the_cap_rise() {
        let (mut b, mut t) = started();
        for _ in 0..10 {
            t = round_at(&mut b, t, 2000, 40, 3_000_000, RTT);
        }
        assert_eq!(b.cap(), None);
        // The queue fills (the round trip doubles), then overflows.
        t = round_at(&mut b, t, 2000, 0, 3_000_000, QUEUED);
        t = round_at(&mut b, t, 2000, 60, 3_000_000, QUEUED);
        let cut = b.cap().expect("3 % lost from a full queue is an overflow");
        // Drained below the cap, the path keeps losing 2.5 % at random.
        for _ in 0..HOLD_ROUNDS + 20 {
            t = round_at(&mut b, t, 2000, 50, 3_000_000, RTT);
        }
        assert!(b.cap().unwrap() > cut, "the cap rises again after the overflow");
    }

    #[test]
    fn on_a_long_path_the_cap_is_held_for_a_time_not_32_round_trips() {
        let mut b = LossBound::new(MTU as u16);
        let long = Duration::from_millis(100);
        let mut t = Instant::now() + long;
        b.on_ack(t, t - long, 0);
        t = round_at(&mut b, t, 8000, 400, 12_000_000, 2 * long);
        let cut = b.cap().expect("an overflow of the 100 ms path");
        for _ in 0..HOLD_TIME.as_millis() / 100 {
            t = round_at(&mut b, t, 8000, 0, 9_000_000, long);
        }
        assert_eq!(b.cap(), Some(cut), "held for about 640 ms");
        round_at(&mut b, t, 8000, 0, 9_000_000, long);
        assert!(b.cap().unwrap() > cut, "then it rises, 7 round trips after the cut");
    }

    #[test]
    fn heavy_loss_cuts_even_without_a_queue() {
        let (mut b, t) = started();
        round_at(&mut b, t, 2000, 400, 3_000_000, RTT);
        assert!(b.cap().is_some(), "20 % lost is a policer or a failing path");
    }

    #[test]
    fn heavy_loss_caps_the_window_below_what_the_round_delivered() {
        let (mut b, mut t) = started();
        t = round(&mut b, t, 4000, 800, 9_000_000);
        let cap = b.cap().expect("20 % loss sets a cap");
        assert_eq!(cap, 3200 * MTU * 80 / 100, "80 % of what the round delivered");
        assert_eq!(b.window(6_000_000), cap);
        assert_eq!(b.window(1_000_000), 1_000_000, "a smaller inner window still rules");
        // The next round's losses are of packets sent before the cut: no second cut.
        t = round(&mut b, t, 4000, 800, 9_000_000);
        assert_eq!(b.cap(), Some(cap), "one cut per overflow");
        // Losses of packets sent after the cut count: down again, from the cap.
        round(&mut b, t, 4000, 400, 9_000_000);
        assert_eq!(b.cap(), Some(cap * 80 / 100));
    }

    #[test]
    fn random_loss_under_two_percent_leaves_the_window_alone() {
        let (mut b, mut t) = started();
        for _ in 0..50 {
            t = round(&mut b, t, 2000, 10, 3_000_000);
        }
        assert_eq!(b.cap(), None);
        assert_eq!(b.window(6_000_000), 6_000_000);
    }

    #[test]
    fn after_a_while_clean_rounds_lift_the_cap_faster_and_faster() {
        let (mut b, mut t) = started();
        t = round(&mut b, t, 1000, 100, 2_000_000);
        let cut = b.cap().unwrap();
        for _ in 0..HOLD_ROUNDS {
            t = round(&mut b, t, 1000, 0, 1_000_000);
        }
        assert_eq!(b.cap(), Some(cut), "held while the path settles");
        let mut caps = vec![];
        for _ in 0..3 {
            t = round(&mut b, t, 1000, 0, 1_000_000);
            caps.push(b.cap().unwrap());
        }
        assert_eq!(caps[0] - cut, MTU);
        assert_eq!(caps[2] - caps[1], 2 * (caps[1] - caps[0]));
        let mut last = caps[2];
        for _ in 0..100 {
            t = round(&mut b, t, 1000, 0, 1_000_000);
            let now = b.cap().unwrap();
            assert!(now - last <= last / 8, "at most an eighth more per round trip");
            last = now;
        }
        assert_eq!(
            b.window(50_000_000),
            50_000_000,
            "a long clean stretch lifts it out of the way"
        );
    }

    /// The inner BBR's debug form (its fields are private).
    fn inner_state(conn: &quinn::Connection) -> String {
        let state = conn
            .congestion_state()
            .into_any()
            .downcast::<Bounded>()
            .expect("bbr-bounded");
        let bbr = state
            .inner
            .into_any()
            .downcast::<quinn::congestion::Bbr>()
            .expect("quinn's bbr");
        format!("{bbr:?}")
    }

    fn field<'a>(state: &'a str, name: &str) -> &'a str {
        let from = state
            .split(&format!(" {name}: "))
            .nth(1)
            .expect("the debug form names it");
        from.split(',').next().unwrap()
    }

    #[tokio::test]
    async fn data_flows_without_a_probe_rtt_at_its_start() {
        let tuning = crate::net::quic::Tuning {
            congestion: crate::net::quic::Congestion::BbrBounded,
            ..Default::default()
        };
        let pair = crate::net::quic::testing::loopback_pair(&tuning).await;
        crate::net::quic::testing::send(&pair, 1 << 20).await;
        let conn = &pair.client;
        // Well within 200 ms of the first data: quinn's BBR alone would be in ProbeRTT now.
        let state = inner_state(conn);
        let mode = field(&state, "mode");
        assert!(
            mode != "ProbeRtt",
            "BBR went into ProbeRTT as data started (mode {mode})"
        );
        assert!(field(&state, "min_rtt") != "0ns", "BBR has a min RTT: {state}");
    }

    #[test]
    fn the_cap_never_falls_below_a_few_packets() {
        let (mut b, mut t) = started();
        for _ in 0..30 {
            t = round(&mut b, t, 40, 20, 40 * MTU);
        }
        assert_eq!(b.cap(), Some(MIN_PACKETS * MTU));
    }

    #[test]
    fn a_stray_loss_in_a_small_round_trip_is_not_an_overflow() {
        let (mut b, mut t) = started();
        for _ in 0..50 {
            t = round(&mut b, t, 16, 1, 16 * MTU);
            t = round(&mut b, t, 100, 7, 100 * MTU);
        }
        assert_eq!(b.cap(), None, "6-7 % of a small round is a few random losses");
        round(&mut b, t, 100, 8, 100 * MTU);
        assert!(b.cap().is_some(), "8 packets and over 2 % is an overflow");
    }
}
