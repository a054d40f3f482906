//! Layer 2 of PHI masking: per-statement mask plans built from RowDescription, and the mask
//! functions that rewrite DataRow and CopyData values that reach a masked identity in clear.
//!
//! Invariants, each tested below: the column count never changes, NULL stays NULL, every masked
//! value is valid for its column's type in the column's format (text or binary) — a mask that
//! cannot apply to a type falls back to that type's redact placeholder — and masking is
//! idempotent, so a value the rewrite (layer 1) already masked passes through unchanged.

use bytes::{BufMut, BytesMut};
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{read_cstr, read_i16, read_i32};
use super::dates::*;
use super::values::*;

/// What happens to one output column's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forwarded unchanged.
    Pass,
    /// Masked; `why` says which rule made the column protected.
    Mask { mask: Mask, why: Why },
    /// Not classified, but text-like: the content detectors run over it (notes carry PHI).
    Scan,
}

/// Why a column is protected, for the audit record and for debugging a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The (table OID, attnum) is classified with this kind.
    Classified(Arc<str>),
    /// No origin (an expression, cast, aggregate, set operation) in a protected statement.
    NoOrigin,
    /// Attnum 0 (or negative with no table): a whole-row value in a protected statement.
    WholeRow,
    /// The origin is a protected view or partition whose columns the classification cannot map.
    ProtectedRelation,
}

/// One output column of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPlan {
    pub type_oid: u32,
    pub format: Format,
    pub action: Action,
}

/// Why a row could not be masked; the caller answers with an ErrorResponse (and, for malformed
/// upstream messages, ends the session), never with the clear row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskError {
    /// The message does not parse, or its column count differs from the plan's.
    Malformed(&'static str),
    /// A protected column of a type the gateway has no valid binary placeholder for.
    UnsupportedBinaryType { column: usize, type_oid: u32 },
    /// COPY data in a format the gateway cannot mask (binary COPY).
    UnsupportedCopyFormat,
}

impl std::fmt::Display for MaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaskError::Malformed(what) => write!(f, "malformed row from the server: {what}"),
            MaskError::UnsupportedBinaryType { column, type_oid } => write!(
                f,
                "column {} (type OID {type_oid}) is protected and cannot be masked in binary format",
                column + 1
            ),
            MaskError::UnsupportedCopyFormat => write!(f, "only text-format COPY can be masked"),
        }
    }
}

impl MaskError {
    /// The error the client gets instead of the row. Malformed upstream data ends the session
    /// (rows can no longer be told apart); an unmaskable binary value fails the statement.
    pub fn to_gate_error(&self) -> GateError {
        match self {
            MaskError::Malformed(_) => GateError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            _ => GateError::error(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string())
                .with_hint("Request this column in text format."),
        }
    }
}

/// Per-statement (or per-portal) mask plan: one entry per output column.
#[derive(Clone)]
pub struct MaskPlan {
    pub columns: Vec<ColumnPlan>,
    pub(crate) ctx: Arc<MaskContext>,
    /// The session's DateStyle when the plan was made: year masks of dates and timestamps in
    /// text keep the style the client parses every other date in.
    pub date_style: DateStyle,
}

/// Treatment of columns protected by their origin rather than by a classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginFallback {
    /// Mask them (default: redact). For statements the rewrite did not mask at the source.
    Mask(Mask),
    /// Run the detectors over text-like ones and pass the rest. For statements the rewrite
    /// (layer 1) masked at the source: their computed columns — `count(*)`, the rewrite's own
    /// `'***' || right(ssn, 4)` — derive only from masked values, and redacting them would
    /// break ordinary queries and undo the rewrite's masks.
    Scan,
}

impl Default for OriginFallback {
    fn default() -> Self {
        OriginFallback::Mask(Mask::Redact)
    }
}

/// Options for building a plan from a RowDescription.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions<'a> {
    /// The statement references a protected relation (decided by the control plane).
    pub touches_protected: bool,
    /// Views, materialized views and partitions whose columns cannot be mapped to rules: any
    /// column originating there is protected in a protected statement.
    pub protected_oids: Option<&'a HashSet<u32>>,
    /// What happens to columns protected by origin (no origin, whole row, protected view or
    /// partition) rather than by a rule.
    pub origin_fallback: OriginFallback,
    /// Run the content detectors over unclassified text-like columns.
    pub scan_text: bool,
}

impl MaskPlan {
    /// A plan from explicit columns (COPY, whose CopyOutResponse has no origins).
    pub fn from_columns(columns: Vec<ColumnPlan>, ctx: Arc<MaskContext>) -> Self {
        MaskPlan { columns, ctx, date_style: DateStyle::Iso }
    }

    /// A plan for a text COPY whose columns' origins and types the control plane supplied
    /// (CopyOutResponse carries neither): classified columns masked, kinds seen in clear
    /// passed, other text-like columns scanned.
    pub fn for_copy(cols: impl Iterator<Item = (Classified, u32)>, ctx: Arc<MaskContext>) -> Self {
        let columns = cols
            .map(|(class, type_oid)| {
                let action = match class {
                    Classified::Masked(r) => Action::Mask { mask: r.mask, why: Why::Classified(r.kind) },
                    Classified::Clear => Action::Pass,
                    Classified::No if scannable(Ty::of(type_oid)) => Action::Scan,
                    Classified::No => Action::Pass,
                };
                ColumnPlan { type_oid, format: Format::Text, action }
            })
            .collect();
        MaskPlan { columns, ctx, date_style: DateStyle::Iso }
    }

    /// Builds the plan from a RowDescription body and the classification lookup.
    pub fn from_row_description(
        body: &[u8],
        lookup: impl Fn(u32, i16) -> Classified,
        opts: &PlanOptions<'_>,
        ctx: Arc<MaskContext>,
    ) -> Result<Self, MaskError> {
        let bad = MaskError::Malformed("RowDescription");
        let mut pos = 0;
        let n = read_i16(body, &mut pos).ok_or(bad.clone())?;
        if n < 0 {
            return Err(bad);
        }
        let mut columns = Vec::with_capacity(n as usize);
        for _ in 0..n {
            read_cstr(body, &mut pos).ok_or(bad.clone())?;
            let table = read_i32(body, &mut pos).ok_or(bad.clone())? as u32;
            let attnum = read_i16(body, &mut pos).ok_or(bad.clone())?;
            let type_oid = read_i32(body, &mut pos).ok_or(bad.clone())? as u32;
            read_i16(body, &mut pos).ok_or(bad.clone())?; // typlen
            read_i32(body, &mut pos).ok_or(bad.clone())?; // typmod
            let format = Format::from_code(read_i16(body, &mut pos).ok_or(bad.clone())?);
            let class = if table != 0 && attnum > 0 { lookup(table, attnum) } else { Classified::No };
            let by_origin = if !opts.touches_protected {
                None
            } else if table == 0 {
                Some(Why::NoOrigin)
            } else if attnum == 0 {
                Some(Why::WholeRow)
            } else if opts.protected_oids.is_some_and(|s| s.contains(&table)) {
                Some(Why::ProtectedRelation)
            } else {
                None
            };
            let scan = scannable(Ty::of(type_oid));
            let action = match (class, by_origin, opts.origin_fallback) {
                (Classified::Masked(r), _, _) => Action::Mask { mask: r.mask, why: Why::Classified(r.kind) },
                (Classified::Clear, _, _) => Action::Pass,
                (Classified::No, Some(why), OriginFallback::Mask(mask)) => Action::Mask { mask, why },
                (Classified::No, Some(_), OriginFallback::Scan) if scan => Action::Scan,
                _ if opts.scan_text && scan => Action::Scan,
                _ => Action::Pass,
            };
            columns.push(ColumnPlan { type_oid, format, action });
        }
        if pos != body.len() {
            return Err(bad);
        }
        Ok(MaskPlan { columns, ctx, date_style: DateStyle::Iso })
    }

    /// Applies Bind's result-format codes (none: all text; one: all columns; else one each).
    /// RowDescription answering Describe of a statement reports 0 for every column; the real
    /// formats are only known at Bind, and a wrong format would produce an invalid value.
    pub fn set_result_formats(&mut self, codes: &[i16]) -> Result<(), MaskError> {
        match codes.len() {
            0 => self.columns.iter_mut().for_each(|c| c.format = Format::Text),
            1 => self.columns.iter_mut().for_each(|c| c.format = Format::from_code(codes[0])),
            n if n == self.columns.len() => {
                for (c, &f) in self.columns.iter_mut().zip(codes) {
                    c.format = Format::from_code(f);
                }
            }
            _ => return Err(MaskError::Malformed("Bind result formats do not match the columns")),
        }
        Ok(())
    }

    /// True if some column is masked or scanned; otherwise rows can be forwarded untouched.
    pub fn is_active(&self) -> bool {
        self.columns.iter().any(|c| c.action != Action::Pass)
    }
}

/// Appends to `out` the DataRow (B) message — tag, length and body — for the DataRow `body`
/// with every protected value masked. On error nothing usable is in `out` past its old length.
pub fn mask_data_row(plan: &MaskPlan, body: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
    let bad = MaskError::Malformed("DataRow");
    let mut pos = 0;
    let n = read_i16(body, &mut pos).ok_or(bad.clone())?;
    if n < 0 || n as usize != plan.columns.len() {
        return Err(MaskError::Malformed("DataRow column count differs from RowDescription"));
    }
    let start = out.len();
    out.reserve(body.len() + 5 + 16 * plan.columns.len());
    out.put_u8(b'D');
    out.put_u32(0);
    out.put_i16(n);
    let mut scratch = Vec::new();
    for (i, col) in plan.columns.iter().enumerate() {
        let len = match read_i32(body, &mut pos) {
            Some(l) => l,
            None => {
                out.truncate(start);
                return Err(bad);
            }
        };
        let value = if len < 0 {
            None
        } else {
            match body.get(pos..pos + len as usize) {
                Some(v) => {
                    pos += len as usize;
                    Some(v)
                }
                None => {
                    out.truncate(start);
                    return Err(bad);
                }
            }
        };
        let masked = match (&col.action, value) {
            (Action::Pass, v) | (_, v @ None) => Ok(v.map(Cow::Borrowed)),
            (action, Some(v)) => mask_value(&plan.ctx, plan.date_style, action, Ty::of(col.type_oid), col.format, v, &mut scratch)
                .map_err(|()| MaskError::UnsupportedBinaryType { column: i, type_oid: col.type_oid }),
        };
        match masked {
            Ok(None) => out.put_i32(-1),
            Ok(Some(v)) => {
                out.put_i32(v.len() as i32);
                out.put_slice(&v);
            }
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    if pos != body.len() {
        out.truncate(start);
        return Err(bad);
    }
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

