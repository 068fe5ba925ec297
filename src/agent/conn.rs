//! Admission: each connection is authenticated and counted against its identity's
//! share, then each request stream is read (authorized before it is read in full) and
//! dispatched by its first message to a push, a pull or an operation.

use super::*;

pub(super) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_conn(conn, shared).await,
                Err(e) => match transfer::revoked(&e) {
                    Some(_) => warn!(%remote, "refused a client whose certificate is revoked (tls.crl)"),
                    None => warn!(%remote, error = %e, "handshake failed"),
                },
            }
        });
    }
}

pub(super) async fn serve_conn(conn: quinn::Connection, shared: Arc<Shared>) {
    let Some(peer) = peer_identity(&conn) else {
        warn!(remote = %conn.remote_address(), "peer certificate names no DNS identity");
        conn.close(quinn::VarInt::from_u32(code::NOT_ALLOWED as u32), b"no identity");
        return;
    };
    let Some(_taken) = admit_conn(&conn, &peer, &shared) else {
        return;
    };
    let span = info_span!("conn", %peer, remote = %conn.remote_address());
    shared.metrics.connection_opened();
    async {
        info!("connected");
        let table = shared.jobs.receiving.clone();
        shared.credit.add(&conn);
        let credit = Some(shared.credit.clone());
        let router = transfer::spawn_data_router(conn.clone(), table.clone(), peer.clone(), credit);
        let idle = shared.config().limits.idle_connection;
        while let Some((send, recv)) = next_request(&conn, &peer, &shared, idle).await {
            let ctx = JobCtx {
                conn: conn.clone(),
                shared: shared.clone(),
                peer: peer.clone(),
                table: table.clone(),
            };
            let Some(request) = admit_request(ctx, send, recv) else {
                continue;
            };
            tokio::spawn(request.instrument(tracing::Span::current()));
        }
        router.abort();
        shared.credit.remove(conn.stable_id());
        info!("disconnected");
    }
    .instrument(span)
    .await;
    shared.metrics.connection_closed();
}

/// Closes a connection with its reason, and logs it (not every one of a flood).
pub(super) fn close_refused(conn: &quinn::Connection, shared: &Shared, peer: &str, code: u16, why: &str) {
    if let Some(held_back) = shared.refusal_log.allow() {
        warn!(%peer, remote = %conn.remote_address(), held_back, "connection refused: {why}");
    }
    conn.close(quinn::VarInt::from_u32(code as u32), why.as_bytes());
}

/// Lets a connection in if its identity is on some allow list and under its own and
/// the agent's connection limits.
pub(super) fn admit_conn(conn: &quinn::Connection, peer: &str, shared: &Arc<Shared>) -> Option<gate::Taken> {
    let live = shared.live();
    let limits = &live.config.limits;
    if !live.config.knows(peer) {
        let why = format!("{peer} is on no allow list of this agent");
        close_refused(conn, shared, peer, code::NOT_ALLOWED, &why);
        return None;
    }
    let max = limits.max_connections;
    if shared.metrics.connections() >= max as u64 {
        let why = format!("agent is at its limit of {max} connections");
        close_refused(conn, shared, peer, code::BUSY, &why);
        return None;
    }
    let per = limits.identity.connections;
    match shared.peers.take(peer, gate::Kind::Connections, 1, per as u64) {
        Ok(taken) => Some(taken),
        Err(_) => {
            let why = format!("{peer} has {per} connections open, its limit");
            close_refused(conn, shared, peer, code::BUSY, &why);
            None
        }
    }
}

/// The next request stream, or `None` once the connection is gone or has been idle
/// (no request of its identity open) for `idle`, in which case it is closed.
pub(super) async fn next_request(
    conn: &quinn::Connection,
    peer: &str,
    shared: &Shared,
    idle: Duration,
) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let mut since = tokio::time::Instant::now();
    loop {
        let wait = (since + idle).saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(wait, conn.accept_bi()).await {
            Ok(stream) => return stream.ok(),
            Err(_) if shared.peers.holds(peer, gate::Kind::Requests) > 0 => {
                since = tokio::time::Instant::now();
            }
            Err(_) => {
                info!(idle_secs = idle.as_secs(), "closing an idle connection");
                conn.close(quinn::VarInt::from_u32(0), b"idle: no request open");
                return None;
            }
        }
    }
}

/// Serves a request if its identity is under its limit of requests at once; else
/// refuses it without reading it.
pub(super) fn admit_request(
    ctx: JobCtx,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let per = ctx.shared.config().limits.identity.streams;
    match ctx.shared.peers.take(&ctx.peer, gate::Kind::Requests, 1, per as u64) {
        Ok(taken) => Some(async move {
            ctx.run(send, recv).await;
            drop(taken);
        }),
        Err(_) => {
            let why = format!("{} has {per} requests open, its limit", ctx.peer);
            let r = refuse(code::BUSY, why).retry_after(RETRY_BUSY);
            if let Some(held_back) = ctx.shared.refusal_log.allow() {
                warn!(held_back, reason = %r, "request refused");
            }
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            tokio::spawn(async move {
                let _ = transfer::write_msg(&mut send, &Message::Reject(r)).await;
                let _ = send.finish();
            });
            None
        }
    }
}

impl JobCtx {
    pub(super) async fn run(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let authorize = |target: &str, len: u64| self.may_send_large(target, len);
        let opened = gate::read_request(&mut recv, authorize)
            .await
            .and_then(|m| session::opening(m).map_err(|p| p.refusal()));
        let result = match opened {
            Ok(Opening::Push(offer)) => self.push(offer, &mut send, &mut recv).await,
            Ok(Opening::Pull { export, files, range }) => self.pull(export, files, range, &mut send, &mut recv).await,
            Ok(Opening::Request(m)) => self.answer(m, &mut send).await,
            Ok(Opening::Ship(ship)) => self.ship(ship, &mut send).await,
            Err(r) => Err(r),
        };
        if let Err(r) = result {
            if let Some(held_back) = self.shared.refusal_log.allow() {
                warn!(code = r.code, reason = %r, held_back, "job refused");
            }
            self.shared.metrics.job(Outcome::Refused);
            let _ = transfer::write_msg(&mut send, &Message::Reject(r)).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }

    /// Whether this peer may have an offer of more than a few KiB read: only into a
    /// target it may write to, and within its share of memory for such reads.
    pub(super) fn may_send_large(&self, target: &str, len: u64) -> Result<gate::Taken, Refusal> {
        self.import_target(&self.shared.live(), target)?;
        let budget = gate::LARGE_BUDGET;
        self.shared
            .peers
            .take(&self.peer, gate::Kind::Reading, len, budget)
            .map_err(|_| {
                let why = format!("{} is sending other large offers; retry", self.peer);
                refuse(code::BUSY, why).retry_after(RETRY_BUSY)
            })
    }

    pub(super) fn import_target(&self, live: &Live, name: &str) -> Result<Import, Refusal> {
        let t = live.config.import(name);
        let t = self.checked(t.map(|t| (t, &t.allow)), "import target", "write to", name)?;
        Ok(t.clone())
    }

    /// Refuses a target that does not exist or whose allow list lacks the peer, alike.
    pub(super) fn checked<'t, T>(
        &self,
        target: Option<(&'t T, &AllowList)>,
        kind: &str,
        verb: &str,
        name: &str,
    ) -> Result<&'t T, Refusal> {
        // The same answer whether the target is missing or closed to this peer: an
        // identity learns nothing of targets it may not use.
        let no = || {
            refuse(
                code::NOT_ALLOWED,
                format!(
                    "{} may not {verb} {kind} {name:?} (there is none it may use by that name)",
                    self.peer
                ),
            )
        };
        match target {
            Some((t, allow)) if allow.allows(&self.peer) => Ok(t),
            _ => Err(no()),
        }
    }

    pub(super) fn export_target(&self, live: &Live, name: &str) -> Result<Export, Refusal> {
        let t = live.config.export(name);
        let t = self.checked(t.map(|t| (t, &t.allow)), "export", "read", name)?;
        Ok(t.clone())
    }
}
