//! QUIC transport settings for bulk transfer: flow-control windows sized to the
//! bandwidth-delay product, path-MTU discovery up to a ceiling, and a selectable
//! congestion controller.
//!
//! quinn's defaults (a 1.25 MB stream window, 10 MB in flight per connection) are far
//! below line rate on a LAN with a few ms of latency. The connection window here is
//! twice the bandwidth-delay product, never below 16 MiB, and a job spreads its blocks
//! over up to 8 streams.
//!
//! The stream window stays small on purpose: quinn closes the whole connection ("too
//! many gaps in stream buffer") once one stream's receive buffer holds more than 1,024
//! disjoint pieces. With 16 MiB stream windows that closed 3 of about 14 pushes of
//! 256 MiB over an emulated 1 Gbit/s, 20 ms link (a burst of losses when the congestion
//! controller overshoots the link's queue); with this window, none of 12. A window of
//! 1,024 x 1,200 bytes (1,200 is the smallest QUIC packet) holds about 1,070 full
//! packets of one stream, so about 540 pieces even if every other packet is lost. Eight
//! streams of it are 9.8 MB in flight per job per round trip: line rate for 1 Gbit/s up
//! to about 80 ms, for 10 Gbit/s up to about 8 ms. The price shows under heavy random
//! loss: with 10 % loss a 64 MiB push took 1.8-3.5 s instead of 1.5 s, as each stream
//! waits for its retransmissions with less room ahead.

use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Congestion controller of the sending side. BBR is the default: on an emulated
/// 1 Gbit/s, 20 ms link with 0.5 % random loss, barge moved 50 MB/s with BBR and
/// 1.1 MB/s with cubic (`benches/link.sh`); on a clean link the two were alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    #[default]
    Bbr,
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(format!("{other:?} is not one of cubic, bbr, newreno")),
        }
    }
}

/// Transport tuning shared by agents and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    pub congestion: Congestion,
    /// Expected path bandwidth, Mbit/s, and round trip, ms: they size the windows.
    pub bandwidth_mbit: u64,
    pub rtt_ms: u64,
    /// Largest UDP payload path-MTU discovery may try (1452 for Ethernet, up to 8952 for jumbo frames).
    pub max_mtu: u16,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            congestion: Congestion::default(),
            bandwidth_mbit: 10_000,
            rtt_ms: 2,
            max_mtu: 1452,
        }
    }
}

/// Smallest connection window, whatever the bandwidth-delay product.
const MIN_CONNECTION_WINDOW: u64 = 16 << 20;

/// Receive window of every stream (see the module docs for why it is not larger).
pub const STREAM_WINDOW: u64 = 1024 * 1200;

impl Tuning {
    /// Bytes in flight on the path: bandwidth x round trip.
    pub fn bdp(&self) -> u64 {
        self.bandwidth_mbit * 1_000_000 / 8 * self.rtt_ms / 1000
    }

    /// Receive window of a connection (all its streams).
    pub fn connection_window(&self) -> u64 {
        (self.bdp() * 2).clamp(MIN_CONNECTION_WINDOW, 1 << 31)
    }

    /// The quinn transport configuration.
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        let var = |v: u64| quinn::VarInt::from_u64(v).expect("window fits a varint");
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(var(STREAM_WINDOW));
        t.receive_window(var(self.connection_window()));
        t.send_window(self.connection_window());
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
        t.keep_alive_interval(Some(Duration::from_secs(5)));
        t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))));
        t.enable_segmentation_offload(true);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_mtu.max(1200));
        t.mtu_discovery_config(Some(mtu));
        match self.congestion {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
            }
        };
        Arc::new(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_bandwidth_delay_product() {
        let lan = Tuning::default();
        assert_eq!(lan.connection_window(), MIN_CONNECTION_WINDOW);
        let wan = Tuning {
            bandwidth_mbit: 1000,
            rtt_ms: 200,
            ..Default::default()
        };
        assert_eq!(wan.bdp(), 25_000_000);
        assert_eq!(wan.connection_window(), 50_000_000);
        for c in ["cubic", "bbr", "newreno"] {
            let t = Tuning {
                congestion: c.parse().unwrap(),
                ..Default::default()
            };
            t.transport();
        }
        assert!("vegas".parse::<Congestion>().is_err());
    }
}
