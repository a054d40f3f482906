//! Session-level backend messages the gateway builds itself: ReadyForQuery, BackendKeyData,
//! ParameterStatus, NegotiateProtocolVersion, Query (used for refusal markers) and CancelRequest.

use super::{put_cstr, put_message};
use bytes::{BufMut, Bytes, BytesMut};

pub fn ready_for_query(status: u8) -> Bytes {
    let mut o = BytesMut::new();
    put_message(&mut o, b'Z', |o| o.put_u8(status));
    o.freeze()
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    let mut o = BytesMut::new();
    put_message(&mut o, b'K', |o| {
        o.put_i32(pid);
        o.put_i32(secret);
    });
    o.freeze()
}

pub fn negotiate_protocol_version(newest_minor: i32, unsupported: &[Vec<u8>]) -> Bytes {
    let mut o = BytesMut::new();
    put_message(&mut o, b'v', |o| {
        o.put_i32(newest_minor);
        o.put_i32(unsupported.len() as i32);
        for name in unsupported {
            put_cstr(o, name);
        }
    });
    o.freeze()
}

/// A simple Query (F) message.
pub fn query(sql: &[u8]) -> Bytes {
    let mut o = BytesMut::with_capacity(sql.len() + 6);
    put_message(&mut o, b'Q', |o| put_cstr(o, sql));
    o.freeze()
}

/// A Parse (F) message with no parameter types.
pub fn parse(name: &[u8], sql: &[u8]) -> Bytes {
    let mut o = BytesMut::with_capacity(sql.len() + name.len() + 10);
    put_message(&mut o, b'P', |o| {
        put_cstr(o, name);
        put_cstr(o, sql);
        o.put_i16(0);
    });
    o.freeze()
}

/// A Parse (F) message with the given raw parameter-type part (Int16 count + Int32 OIDs).
pub fn parse_with_types(name: &[u8], sql: &[u8], param_types: &[u8]) -> Bytes {
    let mut o = BytesMut::with_capacity(sql.len() + name.len() + param_types.len() + 8);
    put_message(&mut o, b'P', |o| {
        put_cstr(o, name);
        put_cstr(o, sql);
        o.put_slice(param_types);
    });
    o.freeze()
}

/// A Describe (F) of a portal.
pub fn describe_portal(portal: &[u8]) -> Bytes {
    let mut o = BytesMut::with_capacity(portal.len() + 7);
    put_message(&mut o, b'D', |o| {
        o.put_u8(b'P');
        put_cstr(o, portal);
    });
    o.freeze()
}

/// A Flush (F): the server sends what it has buffered.
pub fn flush() -> Bytes {
    Bytes::from_static(&[b'H', 0, 0, 0, 4])
}

pub fn terminate() -> Bytes {
    Bytes::from_static(&[b'X', 0, 0, 0, 4])
}

/// An untagged CancelRequest packet for protocol 3.0 keys.
pub fn cancel_request(pid: i32, secret: i32) -> Bytes {
    let mut o = BytesMut::with_capacity(16);
    o.put_i32(16);
    o.put_i32(super::CANCEL_REQUEST_CODE);
    o.put_i32(pid);
    o.put_i32(secret);
    o.freeze()
}

pub fn ssl_request() -> Bytes {
    let mut o = BytesMut::with_capacity(8);
    o.put_i32(8);
    o.put_i32(super::SSL_REQUEST_CODE);
    o.freeze()
}
