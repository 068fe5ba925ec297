//! QUIC transport settings for bulk transfer: flow-control windows and UDP socket
//! buffers sized to the bandwidth-delay product, path-MTU discovery up to a ceiling, and
//! a selectable congestion controller.
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
//! waits for its retransmissions with less room ahead. Where `[transport]` says the
//! path is longer (bandwidth x RTT above 4.9 MB), the window grows with it up to twice
//! that: 2.4 MB holds about 1,690 full packets, still under 1,024 pieces if every other
//! one is lost. Over an emulated 1 Gbit/s, 100 ms link with 2 % loss a 256 MiB push went
//! from 36.6 to 49.7 MB/s with it (`benches/link.sh`, 2026-12-07).
//!
//! The send window (what quinn keeps unacknowledged for a connection) is at least
//! 64 MiB. It bounds only data the peer has granted credit for (its stream and
//! connection windows), so on a short path it changes nothing; on a long one it keeps
//! a sender that does not know the path (a client without `[transport]`) from capping
//! what the receiver's windows allow, which matters most while losses hold data for
//! retransmission: over a 1 Gbit/s, 100 ms link a 1 GiB push went from 0.49 to 0.54 of
//! the link at 2 % loss and from 0.40 to 0.45 at 5 % (`benches/link.sh`, medians of 3,
//! 2026-12-07; the clean link moved within its noise).
//!
//! Jumbo frames take two settings besides the discovery ceiling. quinn's endpoint takes
//! datagrams only up to its `max_udp_payload_size` (1,472 by default), which capped
//! discovery there whatever `max_mtu` said. And quinn 0.11 hands the kernel up to 10
//! packets in one segmentation-offload (GSO) send, while one UDP send may not exceed
//! 64 KiB: with a ceiling above [`GSO_MAX_MTU`] every full batch was refused once
//! discovery got there, quinn took the losses for a black hole and fell back to 1,200
//! bytes. Above that size barge sends without GSO (each packet carries several times the
//! data, so the sends are still fewer). Over loopback, to an agent set to 8,952, a push
//! of 4,096 files of 256 KiB took 5.4-5.7 CPU seconds with the client at 8,952 and
//! 6.7-7.2 at 1,452; with both ends left at 1,452 the transfer bench was as cheap, so the
//! default stays.

use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Congestion controller of the sending side, chosen by `benches/link.sh` (emulated
/// 1 Gbit/s, 20 ms link): with 0.5 % random loss cubic fell to about 1 MB/s while both
/// BBRs kept 79-92 MB/s; on the clean link all three were within a few percent of TCP,
/// but quinn's BBR lost 9-14 % of its packets to the link's queue and `bbr-bounded`
/// 1.0-1.8 %. Hence the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC, loss-based (Linux's default for TCP): it fell to about 1 MB/s at 0.5 % loss.
    Cubic,
    /// quinn's BBR as it is.
    Bbr,
    /// quinn's BBR with an in-flight cap learned from heavy loss ([`crate::net::congestion`]).
    #[default]
    #[serde(rename = "bbr-bounded")]
    BbrBounded,
    /// The classic loss-based controller.
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "bbr-bounded" => Ok(Congestion::BbrBounded),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(format!("{other:?} is not one of bbr-bounded, bbr, cubic, newreno")),
        }
    }
}

/// Transport tuning shared by agents and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// The congestion controller (`transport.congestion`).
    pub congestion: Congestion,
    /// Expected path bandwidth, Mbit/s, and round trip, ms: they size the windows.
    pub bandwidth_mbit: u64,
    /// Expected round trip, ms.
    pub rtt_ms: u64,
    /// Largest UDP payload path-MTU discovery may try (1452 for Ethernet, up to 8952 for jumbo frames).
    pub max_mtu: u16,
    /// A connection that hears nothing from its peer for this long is dead (keep-alives
    /// go out four times as often, so a live peer is never taken for dead): a peer that
    /// died is noticed in seconds, not at QUIC's usual minute.
    pub idle_timeout: Duration,
    /// How long a new connection may take to answer before it counts as refused.
    pub connect_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            congestion: Congestion::default(),
            bandwidth_mbit: 10_000,
            rtt_ms: 2,
            max_mtu: 1452,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Default [`Tuning::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Tuning::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Socket buffers asked for, whatever the bandwidth-delay product (see [`Tuning::socket_buffer`]).
const MIN_SOCKET_BUFFER: usize = 8 << 20;
const MAX_SOCKET_BUFFER: usize = 64 << 20;

/// Largest packet quinn may batch with GSO: it sends up to 10 in one call, and one UDP
/// send carries at most 65,507 bytes.
pub const GSO_MAX_MTU: u16 = 6_550;

/// Smallest connection window, whatever the bandwidth-delay product.
const MIN_CONNECTION_WINDOW: u64 = 16 << 20;

/// The smallest send window (see the module docs).
const MIN_SEND_WINDOW: u64 = 64 << 20;

/// Receive window of every stream on a short path (see the module docs for why it is
/// not larger).
pub const STREAM_WINDOW: u64 = 1024 * 1200;
/// Receive window of every stream on a long path: twice [`STREAM_WINDOW`].
pub const MAX_STREAM_WINDOW: u64 = 2 * STREAM_WINDOW;

impl Tuning {
    /// Bytes in flight on the path: bandwidth x round trip.
    pub fn bdp(&self) -> u64 {
        self.bandwidth_mbit * 1_000_000 / 8 * self.rtt_ms / 1000
    }

    /// UDP send and receive buffer size. The kernel's default receive buffer (208 KiB)
    /// holds under 2 ms at 1 Gbit/s: whenever the receiving task waited that long for a
    /// core (two cores shared with the sender), datagrams were dropped. Over an emulated
    /// 1 Gbit/s, 20 ms link one in six packets was lost that way, and each loss cost a
    /// retransmission and a congestion response.
    pub fn socket_buffer(&self) -> usize {
        (self.bdp() as usize * 2).clamp(MIN_SOCKET_BUFFER, MAX_SOCKET_BUFFER)
    }

    /// How often an idle connection sends a keep-alive: four per idle timeout, so three
    /// lost in a row still do not end a live connection.
    pub fn keep_alive(&self) -> Duration {
        (self.idle_timeout / 4).max(Duration::from_millis(250))
    }

    /// Receive window of each stream: a job's 8 streams together hold twice the
    /// bandwidth-delay product, within [`STREAM_WINDOW`] and [`MAX_STREAM_WINDOW`].
    pub fn stream_window(&self) -> u64 {
        let streams = crate::proto::limits::MAX_STREAMS as u64;
        (self.bdp() * 2 / streams).clamp(STREAM_WINDOW, MAX_STREAM_WINDOW)
    }

    /// Receive window of a connection (all its streams).
    pub fn connection_window(&self) -> u64 {
        (self.bdp() * 2).clamp(MIN_CONNECTION_WINDOW, 1 << 31)
    }

    /// The quinn transport configuration.
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        self.transport_with_uni_streams(64)
    }

    /// The transport configuration, letting the peer open `uni` data streams at first
    /// (an agent starts every connection with few and gives more to those that carry
    /// data, see [`crate::net::credit`]).
    pub fn transport_with_uni_streams(&self, uni: u32) -> Arc<quinn::TransportConfig> {
        let var = |v: u64| quinn::VarInt::from_u64(v).expect("window fits a varint");
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(var(self.stream_window()));
        t.receive_window(var(self.connection_window()));
        t.send_window(self.connection_window().max(MIN_SEND_WINDOW));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(uni));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
        t.keep_alive_interval(Some(self.keep_alive()));
        let idle_ms = self.idle_timeout.as_millis().clamp(1_000, 600_000) as u32;
        t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(idle_ms))));
        t.enable_segmentation_offload(self.max_mtu <= GSO_MAX_MTU);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_mtu.max(1200));
        t.mtu_discovery_config(Some(mtu));
        match self.congestion {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
            Congestion::BbrBounded => {
                t.congestion_controller_factory(Arc::new(crate::net::congestion::BoundedBbr::default()))
            }
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
            }
        };
        Arc::new(t)
    }
}

/// The buffer sizes a socket asked for and got, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    /// Bytes asked for, for both buffers.
    pub asked: usize,
    /// Receive buffer bytes the kernel gave.
    pub receive: usize,
    /// Send buffer bytes the kernel gave.
    pub send: usize,
}

impl Buffers {
    /// Got less than asked (the kernel's `net.core.rmem_max` / `wmem_max` capped it).
    pub fn short(&self) -> bool {
        self.receive < self.asked || self.send < self.asked
    }
}

/// A UDP socket bound to `addr` with buffers sized by `tuning`.
pub fn udp_socket(addr: std::net::SocketAddr, tuning: &Tuning) -> std::io::Result<(std::net::UdpSocket, Buffers)> {
    let sock = std::net::UdpSocket::bind(addr)?;
    let got = size_buffers(&sock, tuning.socket_buffer());
    Ok((sock, got))
}

/// A quinn endpoint on `sock` (a server if `server` is given) on the tokio runtime,
/// taking datagrams as large as `tuning` lets path-MTU discovery go.
pub fn endpoint(
    sock: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    tuning: &Tuning,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut config = quinn::EndpointConfig::default();
    let largest = tuning.max_mtu.clamp(1472, 65_000);
    config
        .max_udp_payload_size(largest)
        .expect("1,472 to 65,000 is in quinn's range");
    quinn::Endpoint::new(config, server, sock, runtime)
}

/// Asks for `size`-byte socket buffers: beyond `net.core.rmem_max` / `wmem_max` when the
/// process may (CAP_NET_ADMIN), else up to those limits; never shrinks a buffer (one that
/// systemd's `ReceiveBuffer=` set, say). Getting less is not an error (the transfer still
/// works, only more slowly under load); the caller decides whether to warn.
pub fn size_buffers(sock: &impl std::os::fd::AsRawFd, size: usize) -> Buffers {
    let fd = sock.as_raw_fd();
    let mut got = [0; 2];
    for (i, (force, plain, limit)) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "rmem_max"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "wmem_max"),
    ]
    .into_iter()
    .enumerate()
    {
        // Linux reports twice the size set (it counts its bookkeeping too).
        let now = || get_int(fd, plain).unwrap_or(0) / 2;
        let before = now();
        if before < size && set_int(fd, force, size).is_err() {
            let max = std::fs::read_to_string(format!("/proc/sys/net/core/{limit}"))
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if max.min(size) > before {
                let _ = set_int(fd, plain, size);
            }
        }
        got[i] = now();
    }
    Buffers {
        asked: size,
        receive: got[0],
        send: got[1],
    }
}

fn set_int(fd: i32, opt: libc::c_int, value: usize) -> std::io::Result<()> {
    let v = value.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: fd is an open socket for the caller's borrow; v outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of_val(&v) as _,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An integer `SOL_SOCKET` option of `fd`.
pub(crate) fn get_int(fd: i32, opt: libc::c_int) -> std::io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: v and len are ours and sized for the option.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    if r == 0 {
        Ok(v.max(0) as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Two connected endpoints on loopback with real certificates, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::net::tls::{TlsFiles, TlsMaterial};

    pub struct Pair {
        pub client: quinn::Connection,
        pub server: quinn::Connection,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
        _certs: tempfile::TempDir,
    }

    pub async fn loopback_pair(tuning: &Tuning) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        crate::net::certs::init_ca(dir.path()).unwrap();
        crate::net::certs::issue(dir.path(), "server", &[]).unwrap();
        crate::net::certs::issue(dir.path(), "client", &[]).unwrap();
        let tls = |name| TlsMaterial::load(&TlsFiles::in_dir(dir.path(), name)).unwrap();
        let sock = || udp_socket("127.0.0.1:0".parse().unwrap(), tuning).unwrap().0;
        let server_config = tls("server").server_config(tuning).unwrap();
        let server = endpoint(sock(), Some(server_config), tuning).unwrap();
        let mut client = endpoint(sock(), None, tuning).unwrap();
        client.set_default_client_config(tls("client").client_config(tuning).unwrap());
        let accept = server.accept();
        let connecting = client.connect(server.local_addr().unwrap(), "server").unwrap();
        let (c, s) = tokio::join!(connecting, async { accept.await.unwrap().await });
        Pair {
            client: c.unwrap(),
            server: s.unwrap(),
            _endpoints: (server, client),
            _certs: dir,
        }
    }

    /// Sends `bytes` on a new stream from client to server; returns when all are read.
    pub async fn send(pair: &Pair, bytes: usize) {
        let server = pair.server.clone();
        let reader = tokio::spawn(async move {
            let mut s = server.accept_uni().await.unwrap();
            s.read_to_end(usize::MAX).await.unwrap().len()
        });
        let mut s = pair.client.open_uni().await.unwrap();
        s.write_all(&vec![7u8; bytes]).await.unwrap();
        s.finish().unwrap();
        assert_eq!(reader.await.unwrap(), bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn path_mtu_discovery_reaches_a_jumbo_ceiling() {
        for max_mtu in [GSO_MAX_MTU, 8952] {
            let t = Tuning {
                max_mtu,
                ..Default::default()
            };
            let pair = testing::loopback_pair(&t).await;
            // Discovery needs a few round trips with data in flight.
            for _ in 0..8 {
                testing::send(&pair, 2 << 20).await;
            }
            let mtu = pair.client.stats().path.current_mtu;
            assert_eq!(mtu, max_mtu, "loopback carries {max_mtu}-byte datagrams");
        }
    }

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
        for c in ["cubic", "bbr", "bbr-bounded", "newreno"] {
            let t = Tuning {
                congestion: c.parse().unwrap(),
                ..Default::default()
            };
            t.transport();
        }
        assert!("vegas".parse::<Congestion>().is_err());
    }

    #[test]
    fn sockets_get_buffers_far_above_the_kernel_default() {
        use std::os::fd::AsRawFd;
        let t = Tuning::default();
        assert_eq!(t.socket_buffer(), MIN_SOCKET_BUFFER);
        let (sock, buffers) = udp_socket("127.0.0.1:0".parse().unwrap(), &t).unwrap();
        let got = get_int(sock.as_raw_fd(), libc::SO_RCVBUF).unwrap() / 2;
        assert_eq!(buffers.receive, got);
        // Without CAP_NET_ADMIN the kernel's limit (rmem_max) caps it; either way it is
        // more than the default of 208 KiB on any host tuned for barge. Root gets all.
        let limit = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse::<usize>()
            .unwrap();
        let want = if unsafe { libc::geteuid() } == 0 {
            MIN_SOCKET_BUFFER
        } else {
            limit.min(MIN_SOCKET_BUFFER)
        };
        assert!(got >= want, "receive buffer {got} < {want}");
        assert_eq!(
            buffers.short(),
            got < MIN_SOCKET_BUFFER || buffers.send < MIN_SOCKET_BUFFER
        );
    }
}
