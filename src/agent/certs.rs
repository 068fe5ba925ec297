//! The agent's certificates in operation: rotated on reload (SIGHUP) or, with
//! `[tls] watch`, when their files change; their expiry shown and warned about.
//!
//! New material is loaded and every configuration made from it before anything is
//! swapped, so a rotation that does not load leaves the agent serving with the old
//! certificates. quinn and rustls use a new configuration for new handshakes only:
//! connections open, and the jobs on them, finish on the session they have.

use super::*;
use crate::net::quic::Tuning;
use crate::net::tls::{CertInfo, TlsFiles};
use std::time::{Instant, SystemTime};

/// From how long before expiry a certificate is warned about, once a day.
pub const WARN_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// How often `[tls] watch` looks at the files.
const WATCH_PERIOD: Duration = Duration::from_secs(2);

/// The certificates the agent serves and connects with now.
pub(super) struct TlsNow {
    pub(super) material: TlsMaterial,
    /// The agent's own certificate.
    pub(super) own: CertInfo,
    /// The CA's.
    pub(super) ca: CertInfo,
    /// The client side of TLS lanes the agent opens to pullers.
    pub(super) lane_client: Arc<rustls::ClientConfig>,
}

impl TlsNow {
    pub(super) fn load(files: &TlsFiles) -> Result<TlsNow, AgentError> {
        let material = TlsMaterial::load(files)?;
        let unreadable = |what: &str| TlsError::Quic(format!("{what} certificate does not parse"));
        Ok(TlsNow {
            own: material.own().ok_or_else(|| unreadable("the agent's"))?,
            ca: material.ca().ok_or_else(|| unreadable("the CA"))?,
            lane_client: material.lane_client_config()?,
            material,
        })
    }
}

/// The QUIC server side made from `material`.
pub(super) fn quic_server(material: &TlsMaterial, tuning: &Tuning) -> Result<quinn::ServerConfig, AgentError> {
    let mut server = material.server_config(tuning)?;
    // A connection may open more data streams only once it carries data (see `credit`):
    // credit given in the handshake could not be taken back.
    server.transport_config(tuning.transport_with_uni_streams(crate::net::credit::MIN_STREAMS));
    Ok(server)
}

impl Shared {
    /// The certificates now.
    pub(super) fn tls(&self) -> Arc<TlsNow> {
        self.tls.read().expect("tls now").clone()
    }

    /// Loads `files` and, if they load and name the agent's identity still, serves new
    /// handshakes with them (QUIC, the TCP lane, the agent's own client).
    pub(super) fn rotate(&self, files: &TlsFiles, tuning: &Tuning) -> Result<(), AgentError> {
        let old = self.tls();
        let new = TlsNow::load(files)?;
        if new.own.identity != old.own.identity {
            return Err(AgentError::IdentityChanged {
                was: old.own.identity.clone().unwrap_or_default(),
                now: new.own.identity.clone().unwrap_or_default(),
            });
        }
        let server = quic_server(&new.material, tuning)?;
        let lane = match &self.tcp {
            Some(_) => Some(new.material.lane_server_config()?),
            None => None,
        };
        self.endpoint.set_server_config(Some(server));
        if let (Some(lanes), Some(lane)) = (&self.tcp, lane) {
            lanes.set_tls(lane);
        }
        *self.client.lock().expect("own client") = None;
        if new.own != old.own || new.ca != old.ca {
            info!(
                serial = %new.own.serial,
                expires = %new.own.expiry(),
                ca_serial = %new.ca.serial,
                "certificates rotated: new connections use them"
            );
        }
        *self.tls.write().expect("tls now") = Arc::new(new);
        Ok(())
    }

    /// Seconds until the agent's and the CA's certificates expire, for metrics.
    pub(super) fn gauges(&self) -> crate::metrics::Gauges {
        let tls = self.tls();
        crate::metrics::Gauges {
            agent_cert_expiry: Some(tls.own.expires_in()),
            ca_cert_expiry: Some(tls.ca.expires_in()),
            ..self.jobs.gauges(self.draining.load(Ordering::Relaxed))
        }
    }
}

/// Warns of certificates near expiry and, with `[tls] watch`, rotates changed files.
pub(super) async fn cert_loop(shared: Arc<Shared>) {
    let mut warned = Warned::default();
    let mut watch = Watch::default();
    loop {
        warned.check(&shared.tls());
        let config = shared.config();
        if config.tls_watch {
            watch.poll(&shared, &config);
        }
        tokio::time::sleep(match config.tls_watch {
            true => WATCH_PERIOD,
            false => Duration::from_secs(60),
        })
        .await;
    }
}

/// When each certificate (by serial) was last warned about.
#[derive(Default)]
struct Warned(HashMap<String, Instant>);

impl Warned {
    fn check(&mut self, tls: &TlsNow) {
        for (which, cert) in [("agent", &tls.own), ("ca", &tls.ca)] {
            let left = cert.expires_in();
            if left > WARN_BEFORE.as_secs() as i64 {
                continue;
            }
            let due = |at: &Instant| at.elapsed() >= Duration::from_secs(24 * 3600);
            if self.0.get(&cert.serial).is_some_and(|at| !due(at)) {
                continue;
            }
            self.0.insert(cert.serial.clone(), Instant::now());
            warn!(
                which,
                serial = %cert.serial,
                expires = %cert.expiry(),
                days_left = left / 86_400,
                "certificate expires soon: issue a new one and reload the agent (see certs/README.md)"
            );
        }
    }
}

/// What `[tls] watch` saw of the files: a change is acted on once it has held still
/// for one look, so that a certificate and key written one after the other are read
/// together.
#[derive(Default)]
struct Watch {
    applied: Option<Vec<Stamp>>,
    last: Option<Vec<Stamp>>,
}

type Stamp = Option<(u64, u64, SystemTime)>;

impl Watch {
    fn poll(&mut self, shared: &Shared, config: &Config) {
        let now: Vec<Stamp> = config.tls.all().map(stamp).collect();
        let settled = self.last.as_ref() == Some(&now);
        self.last = Some(now.clone());
        if self.applied.is_none() {
            self.applied = Some(now);
            return;
        }
        if !settled || self.applied.as_ref() == Some(&now) {
            return;
        }
        self.applied = Some(now);
        match shared.rotate(&config.tls, &config.tuning) {
            Ok(()) => info!("tls files changed: reloaded"),
            Err(e) => warn!(error = %e, "tls files changed but do not load; the running certificates stay"),
        }
    }
}

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}
