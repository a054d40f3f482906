//! The engine: the data plane's shared state — settings, masking state, identifier dictionaries,
//! the bridge, the decision cache, the cancel registry and counters. Sessions read it; `runtime` owns threads and sockets.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::watch;

use crate::bridge::Bridge;
use crate::cache::DecisionCache;
use crate::session::cancel::CancelRegistry;
use crate::masking::dictionary_set::DictionarySet;
use crate::masking::rules::MaskingState;
use crate::config::{NativeConfig, Target};
use crate::disclosures::{SubjectKey, Subjects};

/// A resolved target: its config and the upstream TLS config built from it.
pub struct ResolvedTarget {
    pub target: Arc<Target>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Settings derived from one config version; sessions take a snapshot at connect time.
pub struct Settings {
    pub cfg: NativeConfig,
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub targets: HashMap<String, ResolvedTarget>,
    /// The audit HMAC key subject keys are hashed with, and how many hashes a result keeps
    /// per relation; None without an `[audit]` section (no accounting of disclosures).
    pub disclosures: Option<(Arc<SubjectKey>, usize)>,
    /// The key of the keyed hashes in this config's records (the sessions started under it
    /// keep it to their end).
    pub hash_key: Arc<crate::events::HashKey>,
}

impl Settings {
    pub fn build(cfg: NativeConfig) -> Result<Self, String> {
        let server_tls = match &cfg.tls {
            Some(files) => Some(crate::protocol::tls::server_config(files)?),
            None => None,
        };
        let mut targets = HashMap::new();
        for (name, t) in &cfg.targets {
            let tls = crate::protocol::tls::client_config(t).map_err(|e| format!("targets.{name}: {e}"))?;
            if t.tls != crate::config::UpstreamTls::Disable {
                crate::protocol::tls::server_name(t).map_err(|e| format!("targets.{name}.server_name: {e}"))?;
            }
            targets.insert(name.clone(), ResolvedTarget { target: Arc::new(t.clone()), tls });
        }
        let disclosures = match &cfg.audit {
            Some(a) => Some((Arc::new(SubjectKey::new(&a.hmac_key_bytes()?)), a.disclosures_exact_max)),
            None => None,
        };
        let hash_key = match &cfg.audit {
            Some(a) => crate::events::HashKey::new(&a.hmac_key_bytes()?),
            None => crate::events::HashKey::random(),
        };
        Ok(Settings { cfg, server_tls, targets, disclosures, hash_key: Arc::new(hash_key) })
    }
}

#[derive(Default)]
pub struct Counters {
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub protocol_violations: AtomicU64,
    pub auth_failures: AtomicU64,
    pub cancels_forwarded: AtomicU64,
    pub statements: AtomicU64,
    /// DataRow/CopyData messages layer 2 changed (PHI that arrived in clear, or detector hits).
    pub rows_masked: AtomicU64,
    /// Masked sessions closed because a result could not be attributed or masked.
    pub masking_failures: AtomicU64,
}

pub struct EngineCore {
    settings: RwLock<Arc<Settings>>,
    /// Layer-2 masking rules, keys and detectors; replaced whole by `Engine::set_masking`.
    masking: RwLock<Arc<MaskingState>>,
    /// Identifier dictionaries per target; every masking state's detectors read these, so
    /// they survive `set_masking`.
    pub dictionaries: Arc<DictionarySet>,
    /// Subject relations per target (accounting of disclosures); set by `Engine::set_subjects`.
    pub subjects: Subjects,
    pub bridge: Bridge,
    pub cache: DecisionCache,
    pub cancels: CancelRegistry,
    pub counters: Counters,
    /// true = stop accepting new connections.
    pub stop_accepting: watch::Sender<bool>,
    /// true = close every session now (after the drain grace period).
    pub force_close: watch::Sender<bool>,
}

impl EngineCore {
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }
    pub fn masking(&self) -> Arc<MaskingState> {
        self.masking.read().clone()
    }
}

impl EngineCore {
    /// The shared state for a validated data-plane config: no listeners, no threads.
    pub fn new(cfg: NativeConfig, trail: Option<Arc<crate::audit::Trail>>) -> Result<Self, String> {
        let backlog = cfg.event_backlog_wakeup;
        let settings = Settings::build(cfg)?;
        let mut bridge = Bridge::new(backlog).map_err(|e| format!("cannot create wakeup socket: {e}"))?;
        bridge.trail = trail;
        let dictionaries = Arc::new(DictionarySet::default());
        Ok(EngineCore {
            settings: RwLock::new(Arc::new(settings)),
            masking: RwLock::new(Arc::new(MaskingState::initial(dictionaries.clone()))),
            dictionaries,
            subjects: Subjects::default(),
            bridge,
            cache: DecisionCache::new(),
            cancels: CancelRegistry::default(),
            counters: Counters::default(),
            stop_accepting: watch::channel(false).0,
            force_close: watch::channel(false).0,
        })
    }

    /// New settings for sessions that start from now on.
    pub fn replace_settings(&self, settings: Settings) {
        *self.settings.write() = Arc::new(settings);
    }

    /// New layer-2 masking state for every session's next result.
    pub fn replace_masking(&self, state: MaskingState) {
        *self.masking.write() = Arc::new(state);
    }
}
