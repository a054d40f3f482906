//! The upstream leg: connect to a target's PostgreSQL, optionally over TLS, and authenticate as the
//! gateway's own service identity (SCRAM-SHA-256, md5, cleartext or trust). Agents never see these
//! credentials, and upstream error text is kept for the gateway log, not shown to the agent.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::Target;
use crate::protocol::framing::{next_frame, read_cstr, read_i32};
use crate::protocol::messages::{error_response, put_cstr, put_message, session, startup, tag_b};
use crate::protocol::stream::Stream;

/// Everything the session needs from a freshly authenticated upstream connection.
pub struct Upstream {
    pub stream: Stream,
    /// ParameterStatus messages (whole wire bytes) to pass on to the client.
    pub parameter_status: Vec<Bytes>,
    /// NoticeResponse messages seen during startup, passed on as-is.
    pub notices: Vec<Bytes>,
    pub pid: i32,
    pub secret: i32,
    /// Bytes read past the ReadyForQuery (normally empty).
    pub leftover: BytesMut,
}

/// Why the upstream could not be reached; `public` is safe for the agent, `log` is for operators.
#[derive(Debug)]
pub struct UpstreamError {
    pub public: String,
    pub log: String,
}

fn fail(public: &str, log: impl Into<String>) -> UpstreamError {
    UpstreamError { public: public.to_string(), log: log.into() }
}

/// Upstream messages during startup are small; anything bigger is hostile or broken.
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

pub async fn connect(
    target: &Arc<Target>,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_params: &[(String, String)],
    db_role: Option<&str>,
) -> Result<Upstream, UpstreamError> {
    let timeout = Duration::from_millis(target.connect_timeout_ms);
    let work = async {
        let mut up = connect_inner(target, tls, client_params).await?;
        if let Some(role) = db_role {
            set_role(&mut up, role).await?;
        }
        Ok(up)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail("timed out", format!("no answer from {}:{} within {:?}", target.host, target.port, timeout))),
    }
}

/// Opens the transport (TCP, then TLS if configured).
pub async fn open_transport(target: &Target, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Stream, UpstreamError> {
    let addr = format!("{}:{}", target.host, target.port);
    let tcp = TcpStream::connect(&addr).await.map_err(|e| {
        let kind = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused",
            _ => "connection failed",
        };
        fail(kind, format!("connect {addr}: {e}"))
    })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Stream::Plain(tcp)) };
    let mut tcp = tcp;
    use tokio::io::AsyncWriteExt;
    tcp.write_all(&session::ssl_request()).await.map_err(|e| fail("connection failed", format!("{addr}: {e}")))?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.map_err(|e| fail("connection failed", format!("{addr}: {e}")))?;
    if b[0] != b'S' {
        return Err(fail("upstream refused TLS", format!("{addr} answered {:?} to SSLRequest", b[0] as char)));
    }
    let name = crate::protocol::tls::server_name(target).map_err(|e| fail("TLS configuration error", e))?;
    let conn = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| fail("TLS handshake with upstream failed", format!("{addr}: {e}")))?;
    Ok(Stream::ClientTls(Box::new(conn)))
}

async fn connect_inner(
    target: &Arc<Target>,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_params: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let mut stream = open_transport(target, tls).await?;
    let mut params: Vec<(String, String)> = vec![("user".into(), target.user.clone()), ("database".into(), target.database.clone())];
    // Settings that change how the server lexes statement text are pinned: the gateway parses
    // every statement itself and must read the same tokens the server reads. A client encoding
    // such as SJIS or GBK would make the server convert and parse the bytes differently (a trail
    // byte can be a quote or backslash); standard_conforming_strings=off would turn a backslash
    // inside '...' into an escape and let SQL hide inside what the gateway saw as a literal.
    const LEXER_PINNED: [(&str, &str); 2] = [("client_encoding", "UTF8"), ("standard_conforming_strings", "on")];
    let lexer_pinned = |k: &str| LEXER_PINNED.iter().any(|(p, _)| p.eq_ignore_ascii_case(k));
    for (k, v) in client_params {
        let pinned = target.params.keys().any(|p| p.eq_ignore_ascii_case(k)) || lexer_pinned(k);
        if !pinned {
            params.push((k.clone(), v.clone()));
        }
    }
    for (k, v) in &target.params {
        if !lexer_pinned(k) {
            params.push((k.clone(), v.clone()));
        }
    }
    for (k, v) in LEXER_PINNED {
        params.push((k.into(), v.into()));
    }
    let io = |e: std::io::Error| fail("connection lost during startup", e.to_string());
    stream.write_all(&startup::build(&params)).await.map_err(io)?;

    let mut buf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let mut up = Upstream { stream, parameter_status: vec![], notices: vec![], pid: 0, secret: 0, leftover: BytesMut::new() };
    loop {
        let frame = read_frame(&mut up.stream, &mut buf, "startup").await?;
        let body = frame.body();
        match frame.tag {
            tag_b::AUTHENTICATION => {
                let mut pos = 0;
                let code = read_i32(body, &mut pos).ok_or_else(|| fail("protocol error", "short Authentication"))?;
                let reply = authenticate_step(target, code, &body[pos..], &mut scram)?;
                if let Some(msg) = reply {
                    up.stream.write_all(&msg).await.map_err(io)?;
                }
            }
            tag_b::PARAMETER_STATUS => up.parameter_status.push(frame.bytes.clone()),
            tag_b::NOTICE_RESPONSE => up.notices.push(frame.bytes.clone()),
            tag_b::BACKEND_KEY_DATA => {
                let mut pos = 0;
                up.pid = read_i32(body, &mut pos).unwrap_or(0);
                up.secret = read_i32(body, &mut pos).unwrap_or(0);
            }
            tag_b::NEGOTIATE_PROTOCOL_VERSION => {}
            tag_b::ERROR_RESPONSE => {
                let msg = error_response::field(body, b'M').map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                let code = error_response::field(body, b'C').map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                let public = match code.as_str() {
                    "28P01" | "28000" => "the gateway's service credentials were rejected",
                    "3D000" => "the target database does not exist",
                    "53300" => "upstream has too many connections",
                    "57P03" => "upstream is starting up or shutting down",
                    _ => "upstream refused the connection",
                };
                return Err(fail(public, format!("upstream error {code}: {msg}")));
            }
            tag_b::READY_FOR_QUERY => {
                up.leftover = buf;
                return Ok(up);
            }
            t => return Err(fail("protocol error", format!("unexpected upstream message {:?} during startup", t as char))),
        }
    }
}

/// Reads the next whole upstream message during connection setup (`phase` names it for the log).
async fn read_frame(stream: &mut Stream, buf: &mut BytesMut, phase: &str) -> Result<crate::protocol::framing::Frame, UpstreamError> {
    loop {
        match next_frame(buf, |_| MAX_STARTUP_MESSAGE) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {
                let n = stream.read_into(buf).await.map_err(|e| fail("connection lost during startup", e.to_string()))?;
                if n == 0 {
                    return Err(fail("connection closed during startup", format!("upstream closed the connection during {phase}")));
                }
            }
            Err(e) => return Err(fail("protocol error", format!("upstream {phase}: {e}"))),
        }
    }
}

/// Quotes an identifier the way PostgreSQL's quote_ident does (always quoted).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Makes the session run as the role's database user, so the database enforces least privilege
/// too. Agents can never undo it: SET ROLE, RESET ROLE, DISCARD and SET SESSION AUTHORIZATION are
/// refused by policy.
async fn set_role(up: &mut Upstream, role: &str) -> Result<(), UpstreamError> {
    let io = |e: std::io::Error| fail("connection lost during startup", e.to_string());
    let sql = format!("SET ROLE {}", quote_ident(role));
    up.stream.write_all(&session::query(sql.as_bytes())).await.map_err(io)?;
    let mut buf = std::mem::take(&mut up.leftover);
    let mut error: Option<String> = None;
    loop {
        let frame = read_frame(&mut up.stream, &mut buf, "SET ROLE").await?;
        match frame.tag {
            tag_b::ERROR_RESPONSE => {
                let msg = error_response::field(frame.body(), b'M').map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                error = Some(msg);
            }
            tag_b::PARAMETER_STATUS => {
                // A later report of the same parameter replaces the earlier one.
                let name_of = |b: &Bytes| b[5..].split(|&c| c == 0).next().map(<[u8]>::to_vec);
                let name = name_of(&frame.bytes);
                up.parameter_status.retain(|p| name_of(p) != name);
                up.parameter_status.push(frame.bytes.clone());
            }
            tag_b::NOTICE_RESPONSE => up.notices.push(frame.bytes.clone()),
            tag_b::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    up.leftover = buf;
    match error {
        Some(e) => Err(fail("the gateway could not switch to this role's database user", format!("SET ROLE {role:?}: {e}"))),
        None => Ok(()),
    }
}

/// One authentication exchange step; returns the message to send, if any.
fn authenticate_step(target: &Target, code: i32, data: &[u8], scram: &mut Option<ScramSha256>) -> Result<Option<Bytes>, UpstreamError> {
    let password = || {
        target.password.as_deref().ok_or_else(|| fail("the gateway has no password configured for the upstream", "upstream asked for a password but the target has none"))
    };
    let mut out = BytesMut::new();
    match code {
        0 => return Ok(None),
        3 => {
            let pw = password()?;
            put_message(&mut out, b'p', |o| put_cstr(o, pw.as_bytes()));
        }
        5 => {
            let salt: [u8; 4] = data.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| fail("protocol error", "short md5 salt"))?;
            let hash = postgres_protocol::authentication::md5_hash(target.user.as_bytes(), password()?.as_bytes(), salt);
            put_message(&mut out, b'p', |o| put_cstr(o, hash.as_bytes()));
        }
        10 => {
            let mut pos = 0;
            let mut offered = false;
            while let Some(m) = read_cstr(data, &mut pos) {
                if m.is_empty() {
                    break;
                }
                offered |= m == SCRAM_SHA_256.as_bytes();
            }
            if !offered {
                return Err(fail("upstream offers no supported authentication method", "SASL without SCRAM-SHA-256"));
            }
            // Channel binding is not used on the upstream leg; we announce that honestly ('n').
            let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
            let first = s.message().to_vec();
            *scram = Some(s);
            put_message(&mut out, b'p', |o| {
                put_cstr(o, SCRAM_SHA_256.as_bytes());
                o.put_i32(first.len() as i32);
                o.put_slice(&first);
            });
        }
        11 => {
            let s = scram.as_mut().ok_or_else(|| fail("protocol error", "SASLContinue without SASL"))?;
            s.update(data).map_err(|e| fail("the gateway's service credentials were rejected", format!("SCRAM: {e}")))?;
            let msg = s.message().to_vec();
            put_message(&mut out, b'p', |o| o.put_slice(&msg));
        }
        12 => {
            let mut s = scram.take().ok_or_else(|| fail("protocol error", "SASLFinal without SASL"))?;
            s.finish(data).map_err(|e| fail("upstream server signature did not verify", format!("SCRAM: {e}")))?;
            return Ok(None);
        }
        other => return Err(fail("upstream asks for an unsupported authentication method", format!("authentication code {other}"))),
    }
    Ok(Some(out.freeze()))
}

/// Sends a CancelRequest for an upstream backend on a new connection (TLS if the target uses it).
pub async fn send_cancel(target: &Target, tls: Option<Arc<rustls::ClientConfig>>, pid: i32, secret: i32) -> Result<(), UpstreamError> {
    let timeout = Duration::from_millis(target.connect_timeout_ms);
    let work = async {
        let mut s = open_transport(target, tls).await?;
        s.write_all(&session::cancel_request(pid, secret)).await.map_err(|e| fail("cancel failed", e.to_string()))?;
        // The server closes the connection after reading the request; wait for that briefly.
        let mut b = BytesMut::with_capacity(16);
        let _ = s.read_into(&mut b).await;
        Ok(())
    };
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| Err(fail("cancel timed out", "cancel timed out")))
}
