//! The client side of a session up to ReadyForQuery: TLS negotiation (SSLRequest, GSSENCRequest,
//! PG17 direct TLS with ALPN), the StartupMessage, token authentication through the control plane,
//! the upstream connection, then hand-off to the relay.

use bytes::{Buf, BytesMut};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;

use crate::bridge::{AskError, RequestKind};
use crate::engine::{EngineCore, Settings};
use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{next_frame, next_startup_packet};
use crate::protocol::messages::{authentication, session, startup, tag_f, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::protocol::stream::Stream;
use crate::session::{Established, Identity};

/// Passwords (tokens) are at most this long; JWTs with many groups stay well below.
const MAX_PASSWORD_MESSAGE: usize = 64 * 1024;

/// A failed startup: the error for the client (if the socket is still usable) and what to log.
struct Failure {
    stream: Option<Stream>,
    error: Option<GateError>,
}

impl Failure {
    fn silent() -> Self {
        Failure { stream: None, error: None }
    }
    /// Close without an error message (cancel requests get no answer, as in PostgreSQL).
    fn quiet(stream: Stream) -> Self {
        Failure { stream: Some(stream), error: None }
    }
    fn to(stream: Stream, error: GateError) -> Self {
        Failure { stream: Some(stream), error: Some(error) }
    }
}

/// Runs a connection from its first byte to an authenticated client with an upstream session:
/// None when it ended before (a timeout, a cancel request, a refused login — the client has been
/// told why where it can be).
pub async fn establish(core: &Arc<EngineCore>, settings: &Arc<Settings>, tcp: TcpStream, peer: SocketAddr, session: &Arc<str>) -> Option<Established> {
    let timeout = settings.cfg.startup_timeout();
    let login = Login { core, settings, session, peer };
    // Boxed so the (large) startup state is freed once the session is established.
    let result = match tokio::time::timeout(timeout, Box::pin(startup(&login, tcp))).await {
        Ok(r) => r,
        Err(_) => {
            // The half-open socket is dropped; nothing useful to say to it.
            login.refused(None, "startup_timeout", None, None);
            return None;
        }
    };
    match result {
        Ok(est) => Some(est),
        Err(f) => {
            let mut s = f.stream?;
            let goodbye = async {
                if let Some(e) = f.error {
                    if e.sqlstate == sqlstate::PROTOCOL_VIOLATION {
                        core.counters.protocol_violations.fetch_add(1, Ordering::Relaxed);
                        core.bridge.emit(&json!({"ts": crate::events::now(), "event": "protocol_violation", "session": &**session,
                            "peer": peer.to_string(), "detail": e.message}));
                    }
                    let _ = s.write_all(&e.to_error_response()).await;
                }
                // TLS clients (libpq 17 sends CancelRequest inside TLS) expect close_notify.
                s.shutdown().await;
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), goodbye).await;
            None
        }
    }
}

async fn read_packet(stream: &mut Stream, buf: &mut BytesMut) -> Result<Option<BytesMut>, GateError> {
    loop {
        match next_startup_packet(buf) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => return Err(GateError::protocol(format!("invalid startup packet: {e}"))),
        }
        match stream.read_into(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Refuses plaintext bytes that arrived behind an SSLRequest/GSSENCRequest: a client waits for
/// our one-byte answer, so anything already sent was injected (CVE-2021-23222 class).
fn check_nothing_buffered(stream: &Stream, buf: &BytesMut) -> Result<(), GateError> {
    let mut extra = !buf.is_empty();
    if let Stream::Plain(t) = stream {
        let mut probe = [0u8; 1];
        if let Ok(n) = t.try_read(&mut probe) {
            extra |= n > 0;
        }
    }
    if extra {
        return Err(GateError::protocol("received unencrypted data after SSL request")
            .with_hint("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."));
    }
    Ok(())
}

/// One login attempt: what its records name.
struct Login<'a> {
    core: &'a Arc<EngineCore>,
    settings: &'a Arc<Settings>,
    session: &'a Arc<str>,
    peer: SocketAddr,
}

/// Reason classes the control plane may give for a refused login (anything else: "other").
const AUTH_REASONS: &[&str] = &[
    "expired", "not_yet_valid", "wrong_audience", "wrong_issuer", "bad_signature", "unknown_key",
    "revoked_key", "malformed", "no_role", "missing_claim", "unsupported_algorithm", "not_enabled",
    "jwks_unavailable", "internal_error", "shutting_down",
];

impl Login<'_> {
    /// Writes an auth_failure record: why the login was refused (a reason class, never the
    /// token), the user name the client sent as a keyed hash.
    fn refused(&self, user: Option<&str>, reason: &str, sqlstate: Option<&str>, credential: Option<&serde_json::Value>) {
        self.core.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        self.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "auth_failure", "session": &**self.session,
            "peer": self.peer.to_string(), "reason": reason, "sqlstate": sqlstate,
            "user": user.map(|u| self.settings.hash_key.client_label(u)), "credential": credential}));
    }

    /// A refusal before authentication, recorded and told to the client.
    fn refuse(&self, stream: Stream, user: Option<&str>, reason: &str, err: GateError) -> Failure {
        self.refused(user, reason, Some(err.sqlstate), None);
        Failure::to(stream, err)
    }
}

/// The TLS version a client connection negotiated, as records name it.
fn tls_version(stream: &Stream) -> Option<&'static str> {
    let Stream::ServerTls(conn) = stream else { return None };
    Some(match conn.get_ref().1.protocol_version()? {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "other",
    })
}

async fn startup(login: &Login<'_>, tcp: TcpStream) -> Result<Established, Failure> {
    let (core, settings, peer) = (login.core, login.settings, login.peer);
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) => {}
        _ => return Err(Failure::silent()),
    }
    let mut stream = Stream::Plain(tcp);
    let mut buf = BytesMut::new();
    let mut tls = false;

    if first[0] == 0x16 {
        // PG17 direct TLS: a TLS ClientHello instead of SSLRequest. ALPN `postgresql` is mandatory.
        let Some(acceptor_cfg) = settings.server_tls.clone() else { return Err(Failure::silent()) };
        let Stream::Plain(tcp) = stream else { unreachable!() };
        let conn = match tokio_rustls::TlsAcceptor::from(acceptor_cfg).accept(tcp).await {
            Ok(c) => c,
            Err(_) => return Err(Failure::silent()),
        };
        let alpn_ok = conn.get_ref().1.alpn_protocol() == Some(crate::protocol::tls::ALPN_POSTGRESQL);
        stream = Stream::ServerTls(Box::new(conn));
        if !alpn_ok {
            return Err(Failure::to(stream, GateError::protocol("direct TLS connections must negotiate ALPN \"postgresql\"")));
        }
        tls = true;
    }

    let mut negotiations = 0;
    let pkt = loop {
        negotiations += 1;
        let mut pkt = match read_packet(&mut stream, &mut buf).await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Failure::silent()),
            Err(e) => return Err(Failure::to(stream, e)),
        };
        if negotiations > 4 {
            return Err(Failure::to(stream, GateError::protocol("too many negotiation requests")));
        }
        let code = i32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
        match code {
            SSL_REQUEST_CODE if pkt.len() == 4 => {
                if tls {
                    return Err(Failure::to(stream, GateError::protocol("SSLRequest received on an encrypted connection")));
                }
                if let Err(e) = check_nothing_buffered(&stream, &buf) {
                    return Err(Failure::to(stream, e));
                }
                let Some(cfg) = settings.server_tls.clone() else {
                    if stream.write_all(b"N").await.is_err() {
                        return Err(Failure::silent());
                    }
                    continue;
                };
                if stream.write_all(b"S").await.is_err() {
                    return Err(Failure::silent());
                }
                let Stream::Plain(tcp) = stream else { unreachable!() };
                match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                    Ok(c) => stream = Stream::ServerTls(Box::new(c)),
                    Err(_) => return Err(Failure::silent()),
                }
                tls = true;
            }
            GSSENC_REQUEST_CODE if pkt.len() == 4 => {
                if tls {
                    return Err(Failure::to(stream, GateError::protocol("GSSENCRequest received on an encrypted connection")));
                }
                if let Err(e) = check_nothing_buffered(&stream, &buf) {
                    return Err(Failure::to(stream, e));
                }
                // GSSAPI encryption is not offered; the client goes on with SSLRequest or plaintext.
                if stream.write_all(b"N").await.is_err() {
                    return Err(Failure::silent());
                }
            }
            CANCEL_REQUEST_CODE if pkt.len() == 12 => {
                pkt.advance(4);
                let pid = pkt.get_i32();
                let secret = pkt.get_i32();
                forward_cancel(core, pid, secret).await;
                return Err(Failure::quiet(stream));
            }
            CANCEL_REQUEST_CODE => {
                // Protocol 3.2 longer keys: we only ever issue 4-byte keys, so no such key exists.
                return Err(Failure::quiet(stream));
            }
            _ if (code >> 16) == 3 => break pkt,
            _ => {
                let (maj, min) = ((code >> 16) & 0xffff, code & 0xffff);
                return Err(Failure::to(stream, GateError::fatal(sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("unsupported frontend protocol {maj}.{min}: phigate supports 3.0"))));
            }
        }
    };

    let msg = match startup::parse(&pkt) {
        Ok(m) => m,
        Err(e) => return Err(Failure::to(stream, GateError::protocol(format!("invalid startup packet: {e}")))),
    };
    let mut out = BytesMut::new();
    if msg.minor > 0 || !msg.protocol_options.is_empty() {
        out.extend_from_slice(&session::negotiate_protocol_version(0, &msg.protocol_options));
    }
    if let Some(r) = msg.get("replication") {
        if !matches!(r.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0") {
            return Err(Failure::to(stream, GateError::fatal(sqlstate::INVALID_AUTHORIZATION,
                "replication connections are not allowed through phigate")));
        }
    }
    if settings.cfg.require_tls && !tls {
        return Err(login.refuse(stream, msg.get("user"), "tls_required", GateError::fatal(sqlstate::INVALID_AUTHORIZATION,
            "phigate requires an encrypted connection").with_hint("Connect with sslmode=require or sslmode=verify-full.")));
    }
    let Some(user) = msg.get("user").filter(|u| !u.is_empty()).map(str::to_string) else {
        return Err(login.refuse(stream, None, "no_user", GateError::fatal(sqlstate::INVALID_AUTHORIZATION, "no user name specified in the startup packet")));
    };
    let database = msg.get("database").filter(|d| !d.is_empty()).unwrap_or(&user).to_string();
    let Some(target) = settings.targets.get(&database) else {
        return Err(login.refuse(stream, Some(&user), "unknown_target", GateError::fatal(sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database}\" is not a target configured on this gateway"))
            .with_hint("Use the target name your gateway administrator gave you as the database name.")));
    };
    let mut forwarded = vec![];
    let mut dropped = vec![];
    let mut return_mode = false;
    for (k, v) in &msg.params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            // The gateway's own: never forwarded, and not a dropped parameter either.
            _ if k.eq_ignore_ascii_case(APPROVAL_MODE_PARAMETER) => match v.as_str() {
                "return" => return_mode = true,
                "hold" => {}
                _ => return Err(login.refuse(stream, Some(&user), "malformed", GateError::fatal(INVALID_PARAMETER_VALUE,
                    format!("invalid value for parameter \"{APPROVAL_MODE_PARAMETER}\"")).with_hint("Use \"return\" or \"hold\"."))),
            },
            _ if k.eq_ignore_ascii_case("application_name") => {
                let (name, returns) = application_name_and_mode(v);
                return_mode |= returns;
                if settings.cfg.parameter_allowed(k) {
                    forwarded.push((k.clone(), name.to_string()));
                } else {
                    dropped.push(k.clone());
                }
            }
            _ if settings.cfg.parameter_allowed(k) => forwarded.push((k.clone(), v.clone())),
            _ => dropped.push(k.clone()),
        }
    }
    let application_name = application_name_and_mode(msg.get("application_name").unwrap_or("")).0.to_string();

    // Ask for the token as a cleartext password: only ever inside TLS unless TLS is explicitly off.
    out.extend_from_slice(&authentication::cleartext_password());
    if stream.write_all(&out).await.is_err() {
        return Err(Failure::silent());
    }
    let password = loop {
        match next_frame(&mut buf, |_| MAX_PASSWORD_MESSAGE) {
            Ok(Some(f)) if f.tag == tag_f::PASSWORD => match authentication::password_from_body(f.body()) {
                Some(p) => break p.to_vec(),
                None => return Err(Failure::to(stream, GateError::protocol("invalid password message"))),
            },
            Ok(Some(_)) => return Err(Failure::to(stream, GateError::protocol("expected a password response"))),
            Ok(None) => match stream.read_into(&mut buf).await {
                Ok(0) | Err(_) => return Err(Failure::silent()),
                Ok(_) => {}
            },
            Err(e) => return Err(Failure::to(stream, GateError::protocol(format!("invalid password message: {e}")))),
        }
    };
    let Ok(password) = String::from_utf8(password) else {
        return Err(login.refuse(stream, Some(&user), "malformed", GateError::fatal(sqlstate::INVALID_PASSWORD, "the password must be an access token or API key (UTF-8 text)")));
    };
    if password.is_empty() {
        return Err(login.refuse(stream, Some(&user), "no_credential", GateError::fatal(sqlstate::INVALID_PASSWORD, "empty password: present an access token as the password")));
    }

    let payload = json!({"session": &**login.session, "user": user, "database": database, "password": password,
        "peer": peer.to_string(), "tls": tls, "application_name": application_name});
    let answer = match core.bridge.ask(RequestKind::Authenticate, payload, settings.cfg.auth_timeout()).await {
        Ok(a) => a,
        Err(AskError::TimedOut) | Err(AskError::Dropped) => {
            return Err(login.refuse(stream, Some(&user), "auth_timeout", GateError::fatal(sqlstate::CONNECTION_FAILURE,
                "phigate could not verify your identity in time; try again, and if it persists tell the gateway operator")));
        }
    };
    let identity = match parse_auth_answer(&answer) {
        Ok(i) => i,
        Err((code, msg)) => {
            let reason = answer.get("reason").and_then(|r| r.as_str()).and_then(|r| AUTH_REASONS.iter().find(|k| **k == r)).copied().unwrap_or("other");
            let credential = answer.get("credential").filter(|c| c.is_object());
            login.refused(Some(&user), reason, Some(code), credential);
            return Err(Failure::to(stream, GateError::fatal(code, msg)));
        }
    };

    let upstream = match crate::session::backend::connect(&target.target, target.tls.clone(), &forwarded, identity.db_role.as_deref()).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("phigate: session {}: upstream for target {database:?} failed: {}", login.session, e.log);
            return Err(Failure::to(stream, GateError::fatal(sqlstate::CONNECTION_FAILURE,
                format!("the upstream database for target \"{database}\" is unavailable: {}", e.public))
                .with_hint("The gateway operator can find details in the gateway log.")));
        }
    };
    let crate::session::cancel::Registered { pid: our_pid, secret: our_secret, cancelled, holding } = core.cancels.register(crate::session::cancel::UpstreamKey {
        target: target.target.clone(),
        pid: upstream.pid,
        secret: upstream.secret,
    });
    let mut hello = BytesMut::with_capacity(512);
    hello.extend_from_slice(&authentication::ok());
    for n in &upstream.notices {
        hello.extend_from_slice(n);
    }
    for p in &upstream.parameter_status {
        hello.extend_from_slice(p);
    }
    hello.extend_from_slice(&session::backend_key_data(our_pid, our_secret));
    hello.extend_from_slice(&session::ready_for_query(b'I'));
    if stream.write_all(&hello).await.is_err() {
        core.cancels.unregister(our_pid);
        return Err(Failure::silent());
    }
    Ok(Established {
        tls: tls_version(&stream),
        client: stream,
        client_buf: buf,
        upstream,
        identity,
        target_name: database,
        application_name,
        dropped_parameters: dropped,
        our_pid,
        cancelled,
        holding,
        peer,
        return_mode,
    })
}

/// The startup parameter a connection asks for return mode with: a statement that needs
/// approval is refused at once (the request goes to approvers) instead of held.
const APPROVAL_MODE_PARAMETER: &str = "phigate.approval_mode";
/// The `application_name` suffix that asks for return mode too (for drivers that cannot send
/// other startup parameters); stripped before the name goes upstream.
const RETURN_SUFFIX: &str = "+return";
const INVALID_PARAMETER_VALUE: &str = "22023";

/// An `application_name` as it goes upstream, and whether it asked for return mode.
fn application_name_and_mode(name: &str) -> (&str, bool) {
    match name.strip_suffix(RETURN_SUFFIX) {
        Some(stripped) => (stripped, true),
        None => (name, false),
    }
}

fn parse_auth_answer(a: &serde_json::Value) -> Result<Identity, (&'static str, String)> {
    let internal = || (sqlstate::INVALID_AUTHORIZATION, "phigate could not establish your identity (internal error); tell the gateway operator".to_string());
    if a.get("ok").and_then(|v| v.as_bool()) != Some(true) {
        let code = match a.get("sqlstate").and_then(|v| v.as_str()) {
            Some("28P01") => sqlstate::INVALID_PASSWORD,
            _ => sqlstate::INVALID_AUTHORIZATION,
        };
        let msg = a.get("message").and_then(|v| v.as_str()).unwrap_or("authentication failed").to_string();
        return Err((code, msg));
    }
    let subject = a.get("subject").and_then(|v| v.as_str()).ok_or_else(internal)?.to_string();
    let groups = a.get("groups").and_then(|v| v.as_array()).ok_or_else(internal)?
        .iter().map(|g| g.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(internal)?;
    let class = a.get("identity_class").and_then(|v| v.as_str()).ok_or_else(internal)?;
    let db_role = match a.get("db_role") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_str().filter(|r| !r.is_empty() && !r.contains('\0')).ok_or_else(internal)?.to_string()),
    };
    let close_on_expiry = a.get("close_on_expiry").and_then(|v| v.as_bool()).unwrap_or(true);
    let expires_at = match a.get("expires_at").and_then(|v| v.as_f64()) {
        Some(t) if close_on_expiry && t.is_finite() && t > 0.0 => {
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t))
        }
        _ => None,
    };
    // Fail closed: anything but an explicit false counts as masked.
    let masked = a.get("masked").and_then(|v| v.as_bool()) != Some(false);
    // Absent or malformed: no kind in clear (fail closed).
    let clear_kinds = a.get("clear_kinds").and_then(|v| v.as_array())
        .map(|ks| ks.iter().filter_map(|k| k.as_str().map(str::to_string)).collect()).unwrap_or_default();
    let roles = a.get("roles").and_then(|v| v.as_array())
        .map(|rs| rs.iter().filter_map(|r| r.as_str().map(str::to_string)).collect()).unwrap_or_default();
    // Only an object of strings (and nulls) is recorded: it names the credential, nothing else.
    let credential = match a.get("credential") {
        Some(serde_json::Value::Object(m)) if m.values().all(|v| v.is_string() || v.is_null()) => serde_json::Value::Object(m.clone()),
        _ => serde_json::Value::Null,
    };
    // null or absent: no cap; anything but a positive integer fails the login (fail closed).
    let max_rows = match a.get("max_rows") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(internal)?),
    };
    Ok(Identity { subject, groups, class: class.into(), db_role, expires_at, masked, clear_kinds, roles, credential, max_rows })
}

async fn forward_cancel(core: &Arc<EngineCore>, pid: i32, secret: i32) {
    let Some(key) = core.cancels.cancel(pid, secret) else { return };
    super::cancel_upstream(core, &key).await;
}
