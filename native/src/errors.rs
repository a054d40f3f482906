//! The data plane's one error type: every failure knows its SQLSTATE, its severity and whether
//! the connection must close; only `to_error_response` turns it into wire bytes.

use crate::protocol::messages::error_response;
use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement fails, the session continues.
    Error,
    /// The connection is closed after the message.
    Fatal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateError {
    pub severity: Severity,
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl GateError {
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        GateError { severity: Severity::Fatal, sqlstate, message: message.into(), detail: None, hint: None }
    }
    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> Self {
        GateError { severity: Severity::Error, sqlstate, message: message.into(), detail: None, hint: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    /// The same error, closing the connection (mid-result there is no clean way to fail only
    /// the statement: rows already sent cannot be taken back).
    pub fn into_fatal(mut self) -> Self {
        self.severity = Severity::Fatal;
        self
    }
    pub fn is_fatal(&self) -> bool {
        self.severity == Severity::Fatal
    }
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::fatal(sqlstate::PROTOCOL_VIOLATION, message)
    }
    /// The wire form (B) ErrorResponse.
    pub fn to_error_response(&self) -> Bytes {
        let sev = match self.severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        error_response::build(sev, self.sqlstate, &self.message, self.detail.as_deref(), self.hint.as_deref())
    }
}

/// The refusal while the audit trail cannot be written (`reason`: disk_full, not_writable, …).
pub fn audit_refusal(reason: &str) -> GateError {
    GateError::error(sqlstate::IO_ERROR, format!("phigate cannot write its audit trail ({reason}); statements are refused until it can. Tell the gateway operator."))
}

impl std::fmt::Display for GateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.sqlstate, self.message)
    }
}

/// SQLSTATE codes the gateway itself emits.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const SYSTEM_ERROR: &str = "58000";
    /// The audit trail cannot be written: statements are refused until it can.
    pub const IO_ERROR: &str = "58030";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}
