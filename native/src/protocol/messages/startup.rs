//! StartupMessage (F): parsing the client's, building the gateway's own for the upstream leg.

use super::put_cstr;
use crate::protocol::framing::read_cstr;
use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order sent; names and values as raw bytes (names checked as UTF-8 later).
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for.
    pub protocol_options: Vec<Vec<u8>>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses a StartupMessage packet body (after the length): version then name/value pairs.
pub fn parse(pkt: &[u8]) -> Result<StartupMessage, &'static str> {
    if pkt.len() < 4 {
        return Err("startup packet too short");
    }
    let version = u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
    let mut msg = StartupMessage { major: (version >> 16) as u16, minor: (version & 0xffff) as u16, ..Default::default() };
    let mut pos = 4;
    loop {
        let name = read_cstr(pkt, &mut pos).ok_or("startup packet parameters are not NUL-terminated")?;
        if name.is_empty() {
            break;
        }
        let value = read_cstr(pkt, &mut pos).ok_or("startup parameter has no value")?;
        if name.starts_with(b"_pq_.") {
            msg.protocol_options.push(name.to_vec());
            continue;
        }
        let name = String::from_utf8(name.to_vec()).map_err(|_| "startup parameter name is not UTF-8")?;
        let value = String::from_utf8(value.to_vec()).map_err(|_| "startup parameter value is not UTF-8")?;
        if msg.params.iter().any(|(k, _)| *k == name) {
            return Err("duplicate startup parameter");
        }
        msg.params.push((name, value));
    }
    if pos != pkt.len() {
        return Err("trailing bytes after startup parameters");
    }
    Ok(msg)
}

/// Builds a protocol 3.0 StartupMessage packet (with its length).
pub fn build(params: &[(String, String)]) -> Bytes {
    let mut o = BytesMut::with_capacity(128);
    o.put_i32(0);
    o.put_i32(super::PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut o, k.as_bytes());
        put_cstr(&mut o, v.as_bytes());
    }
    o.put_u8(0);
    let len = o.len() as i32;
    o[0..4].copy_from_slice(&len.to_be_bytes());
    o.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn round_trip() {
        let p = build(&[("user".into(), "a".into()), ("database".into(), "ehr".into())]);
        let m = parse(&p[4..]).unwrap();
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.get("database"), Some("ehr"));
    }
    #[test]
    fn rejects_garbage() {
        assert!(parse(&[0, 3, 0, 0, b'u', b's']).is_err());
        assert!(parse(&[0, 3, 0, 0, b'a', 0, b'b', 0, b'a', 0, b'c', 0, 0]).is_err());
    }
}
