//! Cancel routing: each client session gets its own BackendKeyData (never the upstream's), mapped
//! here to the upstream backend's key so a CancelRequest reaches that backend and no other.

use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Target;

#[derive(Clone)]
pub struct UpstreamKey {
    pub target: Arc<Target>,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, (i32, UpstreamKey)>>,
}

impl CancelRegistry {
    /// Registers a session and returns the (pid, secret) the client is given.
    pub fn register(&self, upstream: UpstreamKey) -> (i32, i32) {
        let mut rng = rand::thread_rng();
        let mut map = self.map.lock();
        loop {
            // Positive pids look like real backend pids to clients that print them.
            let pid: i32 = rng.gen_range(1..i32::MAX);
            if map.contains_key(&pid) {
                continue;
            }
            let secret: i32 = rng.gen();
            map.insert(pid, (secret, upstream));
            return (pid, secret);
        }
    }

    /// Forgets a session's key; returns the upstream key it mapped to.
    pub fn unregister(&self, pid: i32) -> Option<UpstreamKey> {
        self.map.lock().remove(&pid).map(|(_, key)| key)
    }

    /// The upstream key for a client's cancel, if pid and secret match (secret compared in
    /// constant time so a guesser learns nothing from timing).
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<UpstreamKey> {
        use subtle::ConstantTimeEq;
        let map = self.map.lock();
        let (s, key) = map.get(&pid)?;
        bool::from(s.to_be_bytes().ct_eq(&secret.to_be_bytes())).then(|| key.clone())
    }

    /// The upstream key behind one of our own sessions (the gateway cancels its statements
    /// itself, e.g. a result cut at max_rows).
    pub fn upstream_of(&self, pid: i32) -> Option<UpstreamKey> {
        self.map.lock().get(&pid).map(|(_, key)| key.clone())
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
