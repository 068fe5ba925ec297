//! The network: QUIC transport and its tuning, TLS identities and certificates, the
//! listeners anyone can reach, and the opt-in TCP data lane.

pub mod certs;
pub mod congestion;
pub mod credit;
pub mod listen;
pub mod quic;
pub mod tcplane;
pub mod tls;
