//! Complete parsing of the extended-protocol (F) messages the relay forwards: every field is
//! read and every count checked against the body, so nothing PostgreSQL would reject as malformed
//! reaches it. Errors name the defect for the gateway's protocol-violation message.

use crate::protocol::framing::{read_cstr, read_i16, read_i32};

pub struct Parse<'a> {
    pub name: &'a [u8],
    pub sql: &'a [u8],
    /// The raw parameter-type part (Int16 count + Int32 OIDs), forwarded as is.
    pub param_types: &'a [u8],
}

pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// The parameter format codes (Int16 each: none, one for all, or one per value).
    formats: &'a [u8],
    /// The parameter values (each a 4-byte length, -1 for NULL, then the bytes), validated.
    values: &'a [u8],
    params: usize,
}

impl<'a> Bind<'a> {
    /// Each parameter's value as sent (None: SQL NULL).
    pub fn values(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let (mut rest, n) = (self.values, self.params);
        (0..n).map(move |_| {
            // Lengths were checked by `bind`.
            let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            rest = &rest[4..];
            if len < 0 {
                return None;
            }
            let (v, tail) = rest.split_at(len as usize);
            rest = tail;
            Some(v)
        })
    }

    /// Parameter `i`'s format code (0 text, 1 binary), as the Bind's format list gives it.
    pub fn format(&self, i: usize) -> i16 {
        let at = match self.formats.len() / 2 {
            0 => return 0,
            1 => 0,
            _ => 2 * i,
        };
        self.formats.get(at..at + 2).map_or(0, |f| i16::from_be_bytes([f[0], f[1]]))
    }
}

/// The body must end exactly at `pos`.
fn end(body: &[u8], pos: usize, what: &'static str) -> Result<(), &'static str> {
    if pos == body.len() {
        Ok(())
    } else {
        Err(what)
    }
}

fn count(body: &[u8], pos: &mut usize, what: &'static str) -> Result<usize, &'static str> {
    match read_i16(body, pos) {
        Some(n) if n >= 0 => Ok(n as usize),
        _ => Err(what),
    }
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, &'static str> {
    let mut pos = 0;
    let name = read_cstr(body, &mut pos).ok_or("unterminated statement name")?;
    let sql = read_cstr(body, &mut pos).ok_or("unterminated statement text")?;
    let types_at = pos;
    let n = count(body, &mut pos, "invalid parameter type count")?;
    end(body, pos + 4 * n, "parameter type list does not match its count")?;
    Ok(Parse { name, sql, param_types: &body[types_at..] })
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, &'static str> {
    let mut pos = 0;
    let portal = read_cstr(body, &mut pos).ok_or("unterminated portal name")?;
    let statement = read_cstr(body, &mut pos).ok_or("unterminated statement name")?;
    let formats = count(body, &mut pos, "invalid parameter format count")?;
    let formats_at = pos;
    pos = pos.checked_add(2 * formats).filter(|p| *p <= body.len()).ok_or("parameter format list is cut short")?;
    let params = count(body, &mut pos, "invalid parameter count")?;
    if formats > 1 && formats != params {
        return Err("parameter format count matches neither 0, 1 nor the parameter count");
    }
    let values_at = pos;
    for _ in 0..params {
        match read_i32(body, &mut pos) {
            Some(-1) => {}
            Some(len) if len >= 0 => {
                pos = pos.checked_add(len as usize).filter(|p| *p <= body.len()).ok_or("parameter value is cut short")?;
            }
            _ => return Err("invalid parameter length"),
        }
    }
    let results = count(body, &mut pos, "invalid result format count")?;
    end(body, pos + 2 * results, "result format list does not match its count")?;
    Ok(Bind { portal, statement, formats: &body[formats_at..formats_at + 2 * formats], values: &body[values_at..], params })
}

/// Describe and Close: the kind ('S' statement, 'P' portal) and the name.
pub fn target(body: &[u8]) -> Result<(u8, &[u8]), &'static str> {
    let kind = *body.first().ok_or("empty body")?;
    if kind != b'S' && kind != b'P' {
        return Err("kind is neither 'S' nor 'P'");
    }
    let mut pos = 1;
    let name = read_cstr(body, &mut pos).ok_or("unterminated name")?;
    end(body, pos, "bytes after the name")?;
    Ok((kind, name))
}

/// Execute: the portal name (the row limit is any Int32; 0 or less means all rows).
pub fn execute(body: &[u8]) -> Result<&[u8], &'static str> {
    let mut pos = 0;
    let portal = read_cstr(body, &mut pos).ok_or("unterminated portal name")?;
    read_i32(body, &mut pos).ok_or("missing row limit")?;
    end(body, pos, "bytes after the row limit")?;
    Ok(portal)
}

/// CopyFail: one string.
pub fn copy_fail(body: &[u8]) -> Result<(), &'static str> {
    let mut pos = 0;
    read_cstr(body, &mut pos).ok_or("unterminated message")?;
    end(body, pos, "bytes after the message")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bind_body(formats: &[i16], params: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
        let mut b = b"p\0s\0".to_vec();
        b.extend((formats.len() as i16).to_be_bytes());
        formats.iter().for_each(|f| b.extend(f.to_be_bytes()));
        b.extend((params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                None => b.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b.extend((results.len() as i16).to_be_bytes());
        results.iter().for_each(|f| b.extend(f.to_be_bytes()));
        b
    }

    #[test]
    fn bind_is_checked_to_the_last_byte() {
        let ok = bind_body(&[1], &[Some(b"42"), None], &[0, 1]);
        let b = bind(&ok).unwrap();
        assert_eq!((b.portal, b.statement), (&b"p"[..], &b"s"[..]));
        assert_eq!(b.values().collect::<Vec<_>>(), vec![Some(&b"42"[..]), None]);
        let mut junk = ok.clone();
        junk.push(0);
        assert!(bind(&junk).is_err(), "trailing byte");
        assert!(bind(&ok[..ok.len() - 1]).is_err(), "cut short");
        assert!(bind(&bind_body(&[0, 1, 0], &[Some(b"1"), Some(b"2")], &[])).is_err(), "3 formats for 2 parameters");
        let mut long = bind_body(&[], &[Some(b"xy")], &[]);
        long[10..14].copy_from_slice(&100i32.to_be_bytes()); // length past the end
        assert!(bind(&long).is_err());
        let mut neg = bind_body(&[], &[Some(b"xy")], &[]);
        neg[10..14].copy_from_slice(&(-2i32).to_be_bytes());
        assert!(bind(&neg).is_err());
        assert!(bind(b"p\0s").is_err(), "unterminated statement name");
    }

    #[test]
    fn parse_describe_close_execute() {
        let mut p = b"s\0select $1\0".to_vec();
        p.extend(1i16.to_be_bytes());
        p.extend(23u32.to_be_bytes());
        let parsed = parse(&p).unwrap();
        assert_eq!((parsed.name, parsed.sql, parsed.param_types.len()), (&b"s"[..], &b"select $1"[..], 6));
        assert!(parse(&p[..p.len() - 1]).is_err());
        let mut neg = b"s\0x\0".to_vec();
        neg.extend((-1i16).to_be_bytes());
        assert!(parse(&neg).is_err());
        assert_eq!(target(b"Sname\0").unwrap(), (b'S', &b"name"[..]));
        assert!(target(b"Xname\0").is_err() && target(b"Pname").is_err() && target(b"Pa\0b").is_err() && target(b"").is_err());
        assert_eq!(execute(b"p\0\0\0\0\x05").unwrap(), b"p");
        assert!(execute(b"p\0\0\0").is_err() && execute(b"p\0\0\0\0\0\0").is_err());
        assert!(copy_fail(b"why\0").is_ok() && copy_fail(b"why").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&body);
            let _ = bind(&body);
            let _ = target(&body);
            let _ = execute(&body);
            let _ = copy_fail(&body);
            let _ = crate::protocol::messages::query::query_text(&body);
        }

        #[test]
        fn a_valid_bind_parses_and_no_prefix_does(
            formats in proptest::collection::vec(0i16..2, 0..3),
            params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)), 0..4),
            results in proptest::collection::vec(0i16..2, 0..3),
        ) {
            prop_assume!(formats.len() <= 1 || formats.len() == params.len());
            let params: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
            let body = bind_body(&formats, &params, &results);
            prop_assert!(bind(&body).is_ok());
            for cut in 0..body.len() {
                prop_assert!(bind(&body[..cut]).is_err());
            }
        }
    }
}
