//! The running data plane: I/O worker threads, listeners and their accept loops, reconfiguring,
//! counters for the control plane, and graceful shutdown. Each accepted socket becomes a session.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::NativeConfig;
use crate::engine::{EngineCore, Settings};
use crate::masking::dictionary::DictionaryBuilder;
use crate::masking::rules::MaskingState;

/// One I/O thread with its own single-threaded tokio runtime. Sessions never share work, so
/// each lives entirely on one worker: its sockets are registered with that worker's I/O driver
/// and no wakeup crosses threads (a multi-threaded scheduler spent ~6 % of the proxy's time in
/// futex parking under pgbench, on top of work-stealing bookkeeping).
struct Worker {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn(index: usize) -> std::io::Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(format!("phigate-io-{index}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stop_rx.await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("I/O worker thread died while starting"))??;
        Ok(Worker { handle, stop: Some(stop_tx), thread: Some(thread) })
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why an engine could not be made: a bad config, or an audit trail that cannot be opened.
#[derive(Debug)]
pub enum NewError {
    Config(String),
    Audit(String),
}

pub struct Engine {
    pub core: Arc<EngineCore>,
    workers: Mutex<Vec<Worker>>,
    addrs: Mutex<Vec<SocketAddr>>,
}

impl Engine {
    /// Validates the config and opens the audit trail (recovering it, writing audit_open):
    /// a gateway that cannot record what it does does not start.
    pub fn new(config_json: &str) -> Result<Self, NewError> {
        let cfg = NativeConfig::from_json(config_json).map_err(NewError::Config)?;
        let trail = match &cfg.audit {
            Some(a) => Some(Arc::new(crate::audit::Trail::open(a).map_err(NewError::Audit)?)),
            None => None,
        };
        let core = EngineCore::new(cfg, trail).map_err(NewError::Config)?;
        Ok(Engine { core: Arc::new(core), workers: Mutex::new(vec![]), addrs: Mutex::new(vec![]) })
    }

    /// The open audit trail, if the config has one.
    pub fn trail(&self) -> Option<&Arc<crate::audit::Trail>> {
        self.core.bridge.trail.as_ref()
    }

    /// Closes the audit trail (audit_close, final checkpoint, fsync); records after it are lost.
    pub fn close_trail(&self) {
        if let Some(t) = self.trail() {
            t.close();
        }
    }

    /// Binds every listen address and starts the worker threads.
    pub fn start(&self) -> std::io::Result<()> {
        let mut workers = self.workers.lock();
        if !workers.is_empty() {
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
        let mut started = vec![];
        for i in 0..settings.cfg.workers {
            match Worker::spawn(i) {
                Ok(w) => started.push(w),
                Err(e) => {
                    for mut w in started {
                        w.stop();
                    }
                    return Err(e);
                }
            }
        }
        let handles: Arc<Vec<tokio::runtime::Handle>> = Arc::new(started.iter().map(|w| w.handle.clone()).collect());
        let mut addrs = vec![];
        for (i, l) in listeners.into_iter().enumerate() {
            addrs.push(l.local_addr()?);
            let core = self.core.clone();
            let handles = handles.clone();
            // Each listener's accept loop runs on a worker of its own (round-robin).
            started[i % started.len()].handle.spawn(async move {
                match tokio::net::TcpListener::from_std(l) {
                    Ok(listener) => accept_loop(core, listener, handles).await,
                    Err(e) => eprintln!("phigate: cannot register listener: {e}"),
                }
            });
        }
        *self.addrs.lock() = addrs;
        *workers = started;
        Ok(())
    }

    pub fn listen_addresses(&self) -> Vec<String> {
        self.addrs.lock().iter().map(|a| a.to_string()).collect()
    }

    /// New settings for new sessions; bumps the decision epoch.
    /// The audit trail stays the one opened at start: a changed `audit` object takes effect
    /// only on restart (the control plane says so).
    pub fn reconfigure(&self, config_json: &str) -> Result<u64, String> {
        let cfg = NativeConfig::from_json(config_json)?;
        let settings = Settings::build(cfg)?;
        self.core.replace_settings(settings);
        Ok(self.core.cache.bump_epoch())
    }

    /// New layer-2 masking state (catalog rules, pseudonym key, detectors) for every session's
    /// next result. Bumps nothing: the control plane reloads decisions separately.
    pub fn set_masking(&self, json: &str) -> Result<(), String> {
        let state = MaskingState::from_json(json, self.core.dictionaries.clone())?;
        self.core.replace_masking(state);
        Ok(())
    }

    /// Puts `target`'s subject relations in force for every session's next result: `relations`
    /// resolved in its catalog, `names` every relation `[phi.subjects]` names (empty: the target
    /// has none, and its sessions record no disclosures).
    pub fn set_subjects(&self, target: &str, relations: Vec<crate::disclosures::SubjectRelation>, names: Vec<String>) -> Result<(), String> {
        if !self.core.settings().targets.contains_key(target) {
            return Err(format!("no target {target:?} in the configuration; subject relations belong to a configured target"));
        }
        if names.is_empty() {
            self.core.subjects.set(target, None);
        } else {
            let map = crate::disclosures::SubjectMap::new(relations, names.into_iter().map(std::sync::Arc::from));
            self.core.subjects.set(target, Some(std::sync::Arc::new(map)));
        }
        Ok(())
    }

    /// Replaces `target`'s identifier dictionary with `builder`'s entries, or with `extend`
    /// adds them to the current one (every builder of the process shares its keys; one from
    /// `dictionary_builder(target)` also carries the current entries). Applies to every
    /// session's next scan, which reads all targets' dictionaries merged into one. Returns
    /// (entries, bytes) of the target's own dictionary.
    pub fn set_dictionary(&self, target: &str, builder: DictionaryBuilder, extend: bool) -> Result<(usize, usize), String> {
        if !self.core.settings().targets.contains_key(target) {
            return Err(format!("no target {target:?} in the configuration; a dictionary belongs to a configured target"));
        }
        let dictionaries = &self.core.dictionaries;
        let d = if extend {
            dictionaries.replace_with::<String>(target, |current| match current {
                None => Ok(builder.freeze()),
                Some(d) => {
                    let mut merged = DictionaryBuilder::from(&**d);
                    merged.absorb(&builder).ok_or_else(|| {
                        format!("this builder does not hash under the keys of target {target:?}'s dictionary: get one from Engine.dictionary_builder({target:?}) to extend it, or replace the dictionary (extend=False)")
                    })?;
                    Ok(merged.freeze())
                }
            })?
        } else {
            let d = std::sync::Arc::new(builder.freeze());
            dictionaries.set(target, d.clone());
            d
        };
        Ok((d.len(), d.memory_bytes()))
    }

    /// A builder that starts from `target`'s current dictionary (its key, stop words, minimum
    /// length and entries), to add values and pass to `set_dictionary`; None if it has none.
    pub fn dictionary_builder(&self, target: &str) -> Option<DictionaryBuilder> {
        self.core.dictionaries.get(target).map(|d| DictionaryBuilder::from(&*d))
    }

    /// Removes `target`'s dictionary; false if it had none.
    pub fn drop_dictionary(&self, target: &str) -> bool {
        self.core.dictionaries.remove(target)
    }

    /// (target, entries, bytes) of every identifier dictionary: counts only.
    pub fn dictionary_stats(&self) -> Vec<(String, usize, usize)> {
        self.core.dictionaries.stats()
    }

    /// Bytes of the merged dictionary scans read when there are several targets (0 with one).
    pub fn dictionary_merged_bytes(&self) -> usize {
        self.core.dictionaries.merged_bytes()
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
            ("rows_masked", r(&c.rows_masked)),
            ("masking_failures", r(&c.masking_failures)),
            ("epoch", self.core.cache.epoch()),
        ]
    }

    /// Stops accepting, waits up to `grace` for sessions to finish, closes the rest, stops threads.
    pub fn shutdown(&self, grace: Duration) {
        let mut workers = std::mem::take(&mut *self.workers.lock());
        if workers.is_empty() {
            return;
        }
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
        for w in &mut workers {
            w.stop();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(0));
        self.close_trail();
    }
}

async fn accept_loop(core: Arc<EngineCore>, listener: tokio::net::TcpListener, workers: Arc<Vec<tokio::runtime::Handle>>) {
    let mut stop = core.stop_accepting.subscribe();
    let mut next = 0usize;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    next = (next + 1) % workers.len();
                    // Hand the socket over unregistered, so the worker's own I/O driver owns it.
                    let Ok(std_tcp) = tcp.into_std() else { continue };
                    let core = core.clone();
                    workers[next].spawn(async move {
                        if let Ok(tcp) = tokio::net::TcpStream::from_std(std_tcp) {
                            crate::session::run(core, tcp, peer).await;
                        }
                    });
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
