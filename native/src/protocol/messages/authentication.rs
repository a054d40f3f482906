//! Authentication* (B) messages the gateway sends to clients, and PasswordMessage (F) parsing.

use super::put_message;
use bytes::{BufMut, Bytes, BytesMut};

pub fn ok() -> Bytes {
    let mut o = BytesMut::new();
    put_message(&mut o, b'R', |o| o.put_i32(0));
    o.freeze()
}

pub fn cleartext_password() -> Bytes {
    let mut o = BytesMut::new();
    put_message(&mut o, b'R', |o| o.put_i32(3));
    o.freeze()
}

/// The password text of a PasswordMessage body (NUL-terminated string).
pub fn password_from_body(body: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    let pw = crate::protocol::framing::read_cstr(body, &mut pos)?;
    if pos != body.len() {
        return None;
    }
    Some(pw)
}
