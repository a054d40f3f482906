//! Text-format COPY output: masking CopyData by column position, and the CopyOutResponse check.

use bytes::{BufMut, BytesMut};

use crate::protocol::framing::read_i16;
use crate::protocol::messages::put_message;
use super::plan::*;
use super::values::*;

/// Appends the CopyData (B) message — tag, length, payload — for a text-format COPY payload
/// (one or more lines, fields split by `delimiter`, `\N` for NULL, backslash escapes) with the
/// plan applied by column position. Values are masked as text whatever the plan's formats.
pub fn mask_copy_data(plan: &MaskPlan, data: &[u8], delimiter: u8, out: &mut BytesMut) -> Result<(), MaskError> {
    if delimiter == b'\\' || delimiter == b'\n' || delimiter == b'\r' {
        return Err(MaskError::UnsupportedCopyFormat);
    }
    let start = out.len();
    let mut res = Ok(());
    put_message(out, b'd', |o| res = copy_lines(plan, data, delimiter, o));
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// Column count of a CopyOutResponse (B) body whose data can be masked: text format only (the
/// overall format byte 0). Binary COPY is refused; CSV cannot be told from text here, so the
/// caller must know from the statement that it is not CSV (the rewrite emits text format).
pub fn copy_out_columns(body: &[u8]) -> Result<usize, MaskError> {
    let mut pos = 1;
    match body.first() {
        Some(0) => {}
        Some(_) => return Err(MaskError::UnsupportedCopyFormat),
        None => return Err(MaskError::Malformed("CopyOutResponse")),
    }
    let n = read_i16(body, &mut pos).filter(|n| *n >= 0).ok_or(MaskError::Malformed("CopyOutResponse"))?;
    if body.len() != pos + 2 * n as usize {
        return Err(MaskError::Malformed("CopyOutResponse"));
    }
    Ok(n as usize)
}

pub(crate) fn copy_lines(plan: &MaskPlan, data: &[u8], delim: u8, out: &mut BytesMut) -> Result<(), MaskError> {
    let mut scratch = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, had_nl) = match memchr::memchr(b'\n', rest) {
            Some(i) => {
                let l = &rest[..i];
                rest = &rest[i + 1..];
                (l, true)
            }
            None => {
                let l = rest;
                rest = &[];
                (l, false)
            }
        };
        // "\." alone ends the data in old clients' streams; keep it as it is.
        if line == b"\\." {
            out.put_slice(line);
        } else {
            let fields = split_copy_fields(line, delim);
            if fields.len() != plan.columns.len() {
                return Err(MaskError::Malformed("COPY row column count differs from the plan"));
            }
            for (i, (field, col)) in fields.iter().zip(&plan.columns).enumerate() {
                if i > 0 {
                    out.put_u8(delim);
                }
                // A field to scan with nothing identifier-shaped in it stays as it is, still
                // escaped: COPY's escapes (a backslash and one of b f n r t v, the delimiter or
                // a backslash) add no digit, '@' or keyword, so the raw bytes decide safely.
                let unchanged = match col.action {
                    Action::Pass => true,
                    Action::Scan => !plan.ctx.detectors.may_hit(field),
                    Action::Mask { .. } => false,
                };
                if unchanged || *field == b"\\N" {
                    out.put_slice(field);
                    continue;
                }
                // Without a backslash the field's bytes are the value: no copy to unescape.
                let clear: std::borrow::Cow<[u8]> = if memchr::memchr(b'\\', field).is_none() {
                    std::borrow::Cow::Borrowed(field)
                } else {
                    std::borrow::Cow::Owned(copy_unescape(field))
                };
                match mask_value(&plan.ctx, plan.date_style, &col.action, Ty::of(col.type_oid), Format::Text, &clear, &mut scratch) {
                    Ok(None) => out.put_slice(b"\\N"),
                    // Unchanged (a scanned value without a hit): the field as it came, escaped.
                    Ok(Some(std::borrow::Cow::Borrowed(v))) if std::ptr::eq(v, &*clear) => out.put_slice(field),
                    Ok(Some(v)) => copy_escape(&v, delim, out),
                    Err(()) => return Err(MaskError::UnsupportedBinaryType { column: i, type_oid: col.type_oid }),
                }
            }
        }
        if had_nl {
            out.put_u8(b'\n');
        }
    }
    Ok(())
}

/// Splits on unescaped delimiters (COPY writes a delimiter inside a value as backslash + it).
pub(crate) fn split_copy_fields(line: &[u8], delim: u8) -> Vec<&[u8]> {
    let mut fields = Vec::with_capacity(16);
    let (mut i, mut from) = (0, 0);
    // Jump between delimiters and backslashes (SIMD search): a 1 KB note is one or two jumps.
    while let Some(k) = memchr::memchr2(delim, b'\\', &line[i..]) {
        let at = i + k;
        if line[at] == b'\\' {
            i = (at + 2).min(line.len());
            continue;
        }
        fields.push(&line[from..at]);
        from = at + 1;
        i = at + 1;
    }
    fields.push(&line[from.min(line.len())..]);
    fields
}

pub(crate) fn copy_unescape(f: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        let b = f[i];
        if b != b'\\' || i + 1 >= f.len() {
            v.push(b);
            i += 1;
            continue;
        }
        let c = f[i + 1];
        i += 2;
        match c {
            b'b' => v.push(8),
            b'f' => v.push(12),
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'v' => v.push(11),
            b'0'..=b'7' => {
                let mut n = (c - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    n = n * 8 + (f[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                v.push(n as u8);
            }
            b'x' if i < f.len() && f[i].is_ascii_hexdigit() => {
                let mut n = 0u32;
                let mut k = 0;
                while k < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    n = n * 16 + (f[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                v.push(n as u8);
            }
            other => v.push(other),
        }
    }
    v
}

pub(crate) fn copy_escape(v: &[u8], delim: u8, out: &mut BytesMut) {
    for &b in v {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            b'\t' if delim == b'\t' => out.put_slice(b"\\t"),
            8 => out.put_slice(b"\\b"),
            12 => out.put_slice(b"\\f"),
            11 => out.put_slice(b"\\v"),
            d if d == delim => {
                out.put_u8(b'\\');
                out.put_u8(d);
            }
            _ => out.put_u8(b),
        }
    }
}

