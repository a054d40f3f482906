//! The engine: shared state of the data plane (settings, bridge, decision cache, cancel registry,
//! counters), the tokio runtime, listeners and graceful shutdown.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::bridge::Bridge;
use crate::cache::DecisionCache;
use crate::cancel::CancelRegistry;
use crate::config::{NativeConfig, Target};

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
}

impl Settings {
    pub fn build(cfg: NativeConfig) -> Result<Self, String> {
        let server_tls = match &cfg.tls {
            Some(files) => Some(crate::tls::server_config(files)?),
            None => None,
        };
        let mut targets = HashMap::new();
        for (name, t) in &cfg.targets {
            let tls = crate::tls::client_config(t).map_err(|e| format!("targets.{name}: {e}"))?;
            if t.tls != crate::config::UpstreamTls::Disable {
                crate::tls::server_name(t).map_err(|e| format!("targets.{name}.server_name: {e}"))?;
            }
            targets.insert(name.clone(), ResolvedTarget { target: Arc::new(t.clone()), tls });
        }
        Ok(Settings { cfg, server_tls, targets })
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
}

pub struct EngineCore {
    settings: RwLock<Arc<Settings>>,
    pub bridge: Bridge,
    pub cache: DecisionCache,
    pub cancels: CancelRegistry,
    pub counters: Counters,
    next_session: AtomicU64,
    /// true = stop accepting new connections.
    pub stop_accepting: watch::Sender<bool>,
    /// true = close every session now (after the drain grace period).
    pub force_close: watch::Sender<bool>,
}

impl EngineCore {
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct Engine {
    pub core: Arc<EngineCore>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    addrs: Mutex<Vec<SocketAddr>>,
}

impl Engine {
    pub fn new(config_json: &str) -> Result<Self, String> {
        let cfg = NativeConfig::from_json(config_json)?;
        let backlog = cfg.event_backlog_wakeup;
        let settings = Settings::build(cfg)?;
        let bridge = Bridge::new(backlog).map_err(|e| format!("cannot create wakeup socket: {e}"))?;
        let core = EngineCore {
            settings: RwLock::new(Arc::new(settings)),
            bridge,
            cache: DecisionCache::new(),
            cancels: CancelRegistry::default(),
            counters: Counters::default(),
            next_session: AtomicU64::new(1),
            stop_accepting: watch::channel(false).0,
            force_close: watch::channel(false).0,
        };
        Ok(Engine { core: Arc::new(core), runtime: Mutex::new(None), addrs: Mutex::new(vec![]) })
    }

    /// Binds every listen address and starts the worker threads.
    pub fn start(&self) -> std::io::Result<()> {
        let mut rt_slot = self.runtime.lock();
        if rt_slot.is_some() {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "engine already started"));
        }
        let settings = self.core.settings();
        let mut listeners = vec![];
        for a in &settings.cfg.listen {
            let addr: SocketAddr = a.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad listen address {a}")))?;
            let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into()).map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            sock.listen(4096)?;
            sock.set_nonblocking(true)?;
            let std_listener: std::net::TcpListener = sock.into();
            listeners.push(std_listener);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.cfg.workers)
            .thread_name("phigate-io")
            .enable_all()
            .build()?;
        let mut addrs = vec![];
        for l in listeners {
            addrs.push(l.local_addr()?);
            let core = self.core.clone();
            let _guard = rt.enter();
            let listener = tokio::net::TcpListener::from_std(l)?;
            rt.spawn(accept_loop(core, listener));
        }
        *self.addrs.lock() = addrs;
        *rt_slot = Some(rt);
        Ok(())
    }

    pub fn listen_addresses(&self) -> Vec<String> {
        self.addrs.lock().iter().map(|a| a.to_string()).collect()
    }

    /// New settings for new sessions; bumps the decision epoch.
    pub fn reconfigure(&self, config_json: &str) -> Result<u64, String> {
        let cfg = NativeConfig::from_json(config_json)?;
        let settings = Settings::build(cfg)?;
        *self.core.settings.write() = Arc::new(settings);
        Ok(self.core.cache.bump_epoch())
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let c = &self.core.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("sessions_active", r(&c.sessions_active)),
            ("sessions_total", r(&c.sessions_total)),
            ("cache_hits", r(&self.core.cache.hits)),
            ("cache_misses", r(&self.core.cache.misses)),
            ("cache_entries", self.core.cache.len() as u64),
            ("requests_pending", self.core.bridge.pending() as u64),
            ("requests_timed_out", r(&self.core.bridge.timed_out)),
            ("bytes_in", r(&c.bytes_in)),
            ("bytes_out", r(&c.bytes_out)),
            ("protocol_violations", r(&c.protocol_violations)),
            ("auth_failures", r(&c.auth_failures)),
            ("cancels_forwarded", r(&c.cancels_forwarded)),
            ("statements", r(&c.statements)),
            ("epoch", self.core.cache.epoch()),
        ]
    }

    /// Stops accepting, waits up to `grace` for sessions to finish, closes the rest, stops threads.
    pub fn shutdown(&self, grace: Duration) {
        let Some(rt) = self.runtime.lock().take() else { return };
        let _ = self.core.stop_accepting.send(true);
        let deadline = Instant::now() + grace;
        let active = || self.core.counters.sessions_active.load(Ordering::Acquire);
        while active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.core.force_close.send(true);
        let deadline = Instant::now() + Duration::from_secs(2);
        while active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(0));
    }
}

async fn accept_loop(core: Arc<EngineCore>, listener: tokio::net::TcpListener) {
    let mut stop = core.stop_accepting.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(crate::frontend::run_session(core.clone(), tcp, peer));
                }
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
}
