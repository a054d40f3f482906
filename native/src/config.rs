//! The data-plane configuration handed over from the control plane as JSON (docs/native-config.md),
//! validated again here so that a bad value fails closed with the key named.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    Require,
    VerifyFull,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    pub tls: UpstreamTls,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

impl std::fmt::Debug for Target {
    // The password never appears in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn default_connect_timeout() -> u64 {
    5000
}
fn default_workers() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_auth_timeout() -> u64 {
    10_000
}
fn default_decision_timeout() -> u64 {
    5_000
}
fn default_startup_timeout() -> u64 {
    15_000
}
fn default_max_statement() -> usize {
    8 << 20
}
fn default_max_message() -> usize {
    64 << 20
}
fn default_backlog() -> usize {
    512
}
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeConfig {
    pub listen: Vec<String>,
    #[serde(default = "default_workers")]
    pub workers: usize,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default = "default_true")]
    pub require_tls: bool,
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_ms: u64,
    #[serde(default = "default_decision_timeout")]
    pub decision_timeout_ms: u64,
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_ms: u64,
    #[serde(default = "default_max_statement")]
    pub max_statement_bytes: usize,
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Client startup parameters forwarded upstream. Absent means none: the control plane owns
    /// the default list (phigate.config.DEFAULT_STARTUP_PARAMETERS) and always sends it.
    #[serde(default)]
    pub startup_parameters: Vec<String>,
    #[serde(default = "default_backlog")]
    pub event_backlog_wakeup: usize,
    pub targets: BTreeMap<String, Target>,
    /// The audit trail (docs/audit.md); absent only for embedding and tests: `phigate serve`
    /// refuses to start without one.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditSettings>,
}

impl NativeConfig {
    pub fn from_json(s: &str) -> Result<Self, String> {
        let cfg: NativeConfig = serde_json::from_str(s).map_err(|e| format!("data-plane config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("listen: at least one address is required".into());
        }
        for a in &self.listen {
            a.parse::<std::net::SocketAddr>().map_err(|_| format!("listen: {a:?} is not an ip:port address"))?;
        }
        if self.require_tls && self.tls.is_none() {
            return Err("tls: require_tls is true but no certificate and key are configured".into());
        }
        if !(1..=64).contains(&self.workers) {
            return Err("workers: must be between 1 and 64".into());
        }
        if self.max_statement_bytes < 1024 || self.max_statement_bytes > self.max_message_bytes {
            return Err("max_statement_bytes: must be at least 1024 and at most max_message_bytes".into());
        }
        if self.max_message_bytes > 1 << 30 {
            return Err("max_message_bytes: must be at most 1 GiB".into());
        }
        if self.targets.is_empty() {
            return Err("targets: at least one target is required".into());
        }
        if let Some(a) = &self.audit {
            a.hmac_key_bytes()?;
        }
        for (name, t) in &self.targets {
            if t.tls == UpstreamTls::VerifyFull && t.ca_file.is_none() {
                return Err(format!("targets.{name}.ca_file: required when tls is verify-full"));
            }
        }
        if let Some(a) = &self.audit {
            a.validate()?;
        }
        Ok(())
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }
    pub fn decision_timeout(&self) -> Duration {
        Duration::from_millis(self.decision_timeout_ms)
    }
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }
    /// Whether a client startup parameter may be forwarded upstream (case-insensitive, like GUC names).
    pub fn parameter_allowed(&self, name: &str) -> bool {
        self.startup_parameters.iter().any(|p| p.eq_ignore_ascii_case(name))
    }
}
