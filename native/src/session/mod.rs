//! One client session: the frontend (TLS, startup, authentication, the upstream connection), then
//! the relay until either side ends it, then an upstream cancel if the server still works for a
//! client that is gone. The engine holds only shared state; this module runs a session from it.

pub mod backend;
pub mod cancel;
pub mod frontend;
pub mod pipeline;
#[cfg(test)]
mod pipeline_model;
pub mod relay;
pub mod rowcap;

use bytes::BytesMut;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;

use crate::engine::EngineCore;
use crate::protocol::stream::Stream;

/// The identity the control plane established for this session.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    pub groups: Vec<String>,
    pub class: Arc<str>,
    /// Upstream role the session runs as (SET ROLE right after the gateway's own login).
    pub db_role: Option<String>,
    /// When the credential stops being valid, if the session must close then.
    pub expires_at: Option<std::time::SystemTime>,
    /// Sees some classified PHI kind masked: errors and notices are scrubbed before they leave.
    pub masked: bool,
    /// PHI kinds it sees in clear (layer 2 passes those columns untouched).
    pub clear_kinds: Vec<String>,
    /// The gateway roles it holds on this target (for the session's audit record).
    pub roles: Vec<String>,
    /// What it presented: `{"kind": "token", "jti", "iss"}` or `{"kind": "api_key", "key_id",
    /// "name"}` (for the session's audit record; never the token or key itself).
    pub credential: serde_json::Value,
    /// max_rows: rows one result may send at most (None: no cap).
    pub max_rows: Option<u64>,
}

/// What a successful startup hands to the relay.
pub struct Established {
    pub client: Stream,
    pub client_buf: BytesMut,
    pub upstream: crate::session::backend::Upstream,
    pub identity: Identity,
    pub target_name: String,
    pub application_name: String,
    /// The negotiated TLS version ("TLSv1.3"), None for a plaintext connection.
    pub tls: Option<&'static str>,
    pub dropped_parameters: Vec<String>,
    pub our_pid: i32,
    /// Woken by each CancelRequest with this session's key (see cancel.rs).
    pub cancelled: Arc<tokio::sync::Notify>,
    /// Set while a statement waits for approval: a cancel then goes to the gateway only.
    pub holding: Arc<std::sync::atomic::AtomicBool>,
    pub peer: SocketAddr,
    /// The connection asked for return mode (statements needing approval are refused at once).
    pub return_mode: bool,
}

/// Counts a session as active for as long as it lives.
struct ActiveGuard(Arc<EngineCore>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.counters.sessions_active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs one accepted connection to its end.
pub async fn run(core: Arc<EngineCore>, tcp: TcpStream, peer: SocketAddr) {
    core.counters.sessions_active.fetch_add(1, Ordering::AcqRel);
    let _guard = ActiveGuard(core.clone());
    let settings = core.settings();
    // Names this session in every record about it, from its first authentication attempt on.
    let session = crate::events::session_uuid();
    let started = std::time::Instant::now();
    let Some(est) = frontend::establish(&core, &settings, tcp, peer, &session).await else { return };
    core.counters.sessions_total.fetch_add(1, Ordering::Relaxed);
    let key = &settings.hash_key;
    core.bridge.emit(&json!({
        "ts": crate::events::now(), "event": "session_start", "session": &*session,
        "subject": est.identity.subject, "groups": est.identity.groups, "roles": est.identity.roles,
        "credential": est.identity.credential, "peer": peer.to_string(),
        "target": est.target_name, "application_name": key.client_label(&est.application_name), "tls": est.tls,
        "dropped_parameters": est.dropped_parameters.iter().map(|p| key.parameter_label(p)).collect::<Vec<_>>(),
    }));
    let our_pid = est.our_pid;
    let end = Box::pin(crate::session::relay::run(core.clone(), settings.clone(), est, session.clone())).await;
    if let Some(key) = core.cancels.unregister(our_pid) {
        if end.cancel_upstream {
            // The client is gone (or the gateway closed the session) while the server still
            // works for it: cancel the statement, or it runs to its end. The backend itself
            // exits when it next reads the connection the relay has closed.
            cancel_upstream(&core, &key).await;
        }
    }
    core.bridge.emit(&json!({
        "ts": crate::events::now(), "event": "session_end", "session": &*session,
        "duration_us": u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "bytes_in": end.bytes_in, "bytes_out": end.bytes_out, "statements": end.statements, "reason": end.reason,
    }));
}

/// Sends a CancelRequest to the upstream backend behind `key`.
pub async fn cancel_upstream(core: &Arc<EngineCore>, key: &cancel::UpstreamKey) {
    let tls = core.settings().targets.values().find(|t| Arc::ptr_eq(&t.target, &key.target)).and_then(|t| t.tls.clone())
        .or_else(|| crate::protocol::tls::client_config(&key.target).ok().flatten());
    if crate::session::backend::send_cancel(&key.target, tls, key.pid, key.secret).await.is_ok() {
        core.counters.cancels_forwarded.fetch_add(1, Ordering::Relaxed);
    }
}
