//! Cancel routing: each client session gets its own BackendKeyData (never the upstream's), mapped
//! here to the upstream backend's key so a CancelRequest reaches that backend and no other. A
//! CancelRequest also wakes the session itself: a statement held for approval is not upstream,
//! so only the gateway can cancel it.

use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

use crate::config::Target;

#[derive(Clone)]
pub struct UpstreamKey {
    pub target: Arc<Target>,
    pub pid: i32,
    pub secret: i32,
}

/// One session's entry: the secret the client was given, the upstream key, and what a matching
/// CancelRequest wakes.
struct Entry {
    secret: i32,
    upstream: UpstreamKey,
    cancelled: Arc<Notify>,
    holding: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, Entry>>,
}

/// What a session gets from the registry.
pub struct Registered {
    /// The BackendKeyData the client is given.
    pub pid: i32,
    pub secret: i32,
    /// Woken (`notify_waiters`: only tasks waiting at that moment) by each matching CancelRequest.
    pub cancelled: Arc<Notify>,
    /// Set by the session while a statement waits for approval (nothing of it is upstream).
    pub holding: Arc<AtomicBool>,
}

impl CancelRegistry {
    /// Registers a session: the key the client is given and what its cancels wake.
    pub fn register(&self, upstream: UpstreamKey) -> Registered {
        let mut rng = rand::thread_rng();
        let mut map = self.map.lock();
        loop {
            // Positive pids look like real backend pids to clients that print them.
            let pid: i32 = rng.gen_range(1..i32::MAX);
            if map.contains_key(&pid) {
                continue;
            }
            let secret: i32 = rng.gen();
            let (cancelled, holding) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
            map.insert(pid, Entry { secret, upstream, cancelled: cancelled.clone(), holding: holding.clone() });
            return Registered { pid, secret, cancelled, holding };
        }
    }

    /// Forgets a session's key; returns the upstream key it mapped to.
    pub fn unregister(&self, pid: i32) -> Option<UpstreamKey> {
        self.map.lock().remove(&pid).map(|e| e.upstream)
    }

    /// A client's cancel: if pid and secret match (secret compared in constant time so a
    /// guesser learns nothing from timing), wakes the session (a statement it holds for
    /// approval is withdrawn) and returns the upstream key to cancel whatever runs there — None
    /// while a statement is held: it is not upstream, and a cancel sent there would reach the
    /// refusal that replaces it, or the session's next statement.
    pub fn cancel(&self, pid: i32, secret: i32) -> Option<UpstreamKey> {
        use subtle::ConstantTimeEq;
        let map = self.map.lock();
        let e = map.get(&pid)?;
        if !bool::from(e.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return None;
        }
        e.cancelled.notify_waiters();
        (!e.holding.load(Ordering::SeqCst)).then(|| e.upstream.clone())
    }

    /// The upstream key behind one of our own sessions (the gateway cancels its statements
    /// itself, e.g. a result cut at max_rows).
    pub fn upstream_of(&self, pid: i32) -> Option<UpstreamKey> {
        self.map.lock().get(&pid).map(|e| e.upstream.clone())
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> UpstreamKey {
        let target: Target = serde_json::from_value(serde_json::json!({"host": "127.0.0.1", "port": 5432, "database": "d", "user": "u", "tls": "disable"})).unwrap();
        UpstreamKey { target: Arc::new(target), pid: 7, secret: 9 }
    }

    #[tokio::test]
    async fn a_matching_cancel_wakes_the_waiting_session_only() {
        let reg = CancelRegistry::default();
        let a = reg.register(key());
        let b = reg.register(key());
        let (wait_a, wait_b) = (a.cancelled.notified(), b.cancelled.notified());
        tokio::pin!(wait_a, wait_b);
        wait_a.as_mut().enable();
        wait_b.as_mut().enable();
        // A wrong secret wakes nobody and names no upstream backend.
        assert!(reg.cancel(a.pid, a.secret.wrapping_add(1)).is_none());
        assert_eq!(reg.cancel(a.pid, a.secret).map(|k| k.pid), Some(7));
        tokio::time::timeout(std::time::Duration::from_secs(5), wait_a).await.expect("the held session is woken");
        assert!(futures_poll_once(wait_b.as_mut()).await.is_none(), "the other session is not");
        // A cancel while nobody waits is not kept for a later hold.
        assert!(reg.cancel(b.pid, b.secret).is_some());
        let later = b.cancelled.notified();
        tokio::pin!(later);
        assert!(futures_poll_once(later.as_mut()).await.is_none());
        assert!(reg.unregister(a.pid).is_some());
        assert!(reg.cancel(a.pid, a.secret).is_none());
    }

    /// Polls a future once: Some if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }))
        .await
    }
}
