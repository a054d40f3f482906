//! Start-up: finds where the trail stopped. A torn last line is set aside and cut; the tree is
//! restored from the last checkpoint record's compact range plus the records after it, so old
//! segments are never reread; seq and chain continue from the last line.

use serde_json::Value;
use std::path::{Path, PathBuf};

use super::merkle::{from_hex, leaf_hash, CompactRange, Hash};
use super::segment;

/// What a start-up found on disk.
pub struct Recovered {
    pub position: Position,
    /// The last segment to keep appending to: (path, first seq, length, first record's time).
    pub segment: Option<(PathBuf, u64, u64, Option<i64>)>,
    /// The torn tail set aside, as the audit_open record reports it.
    pub torn: Option<Value>,
    /// `name+hash` of the keys that signed the last checkpoint (empty: no checkpoint yet).
    pub last_signers: Vec<String>,
}

/// Where the next record goes: its seq, the previous line's leaf hash, the tree so far, and
/// how many records the last checkpoint does not cover yet.
pub struct Position {
    pub next_seq: u64,
    pub prev: Hash,
    pub tree: CompactRange,
    pub since_checkpoint: u64,
}

fn err(path: &Path, what: impl std::fmt::Display) -> String {
    format!("audit trail {}: {what}", path.display())
}

/// Complete lines of a segment (without their "\n").
fn lines(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&c| c == b'\n').filter(|l| !l.is_empty()).collect()
}

fn parse_line(line: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(line).ok().filter(|v| v.get("seq").and_then(Value::as_u64).is_some())
}

fn is_checkpoint(line: &[u8]) -> Option<Value> {
    // A cheap filter first: only a line holding the pattern can be a checkpoint record.
    memchr::memmem::find(line, br#""event":"checkpoint""#)?;
    parse_line(line).filter(|v| v["rec"]["event"] == "checkpoint")
}

/// Sets aside whatever follows the last complete, parseable line of `path`, and cuts it off.
fn set_aside_torn_tail(path: &Path, data: &mut Vec<u8>) -> Result<Option<Value>, String> {
    let mut keep = data.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if keep > 0 {
        let start = data[..keep - 1].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        if parse_line(&data[start..keep - 1]).is_none() {
            keep = start; // a complete line that does not parse is torn too
        }
    }
    if keep == data.len() {
        return Ok(None);
    }
    let tail = data.split_off(keep);
    let secs = super::time::now_us() / 1_000_000;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let aside = path.with_file_name(format!("{name}.torn-{secs}"));
    std::fs::write(&aside, &tail).map_err(|e| err(&aside, format!("cannot set the torn tail aside: {e}")))?;
    std::fs::File::open(&aside).and_then(|f| f.sync_all()).map_err(|e| err(&aside, e))?;
    let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| err(path, e))?;
    f.set_len(keep as u64).and_then(|()| f.sync_all()).map_err(|e| err(path, format!("cannot cut the torn tail: {e}")))?;
    if let Some(dir) = path.parent() {
        segment::sync_dir(dir).map_err(|e| err(dir, e))?;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &tail);
    Ok(Some(serde_json::json!({"segment": name, "bytes": tail.len(), "sha256": super::merkle::to_hex(&digest.as_ref().try_into().unwrap_or([0; 32]))})))
}

/// The tree up to and including a checkpoint line, from its record's compact range.
fn tree_at_checkpoint(path: &Path, line: &[u8], v: &Value) -> Result<(CompactRange, Vec<String>), String> {
    let rec = &v["rec"];
    let size = rec["size"].as_u64().ok_or_else(|| err(path, "a checkpoint record has no size"))?;
    let hashes: Option<Vec<Hash>> = rec["range"].as_array().map(|a| a.iter().filter_map(|h| h.as_str().and_then(from_hex)).collect());
    let mut tree = hashes
        .and_then(|h| CompactRange::from_parts(size, h))
        .filter(|_| v["seq"].as_u64() == Some(size))
        .ok_or_else(|| err(path, format!("the checkpoint record at seq {size} has a malformed range; run `phigate audit verify` on the trail")))?;
    tree.append(leaf_hash(line));
    Ok((tree, super::note::note_signers(rec["note"].as_str().unwrap_or_default())))
}

/// The tree so far, who signed it, the lines still to hash, and the line before them.
type Start<'a> = (CompactRange, Vec<String>, &'a [&'a [u8]], Option<Vec<u8>>);

pub fn recover(dir: &Path) -> Result<Recovered, String> {
    let segments = segment::list(dir).map_err(|e| err(dir, format!("cannot list: {e}")))?;
    let Some((first_seq, path)) = segments.last().cloned() else {
        let position = Position { next_seq: 0, prev: [0; 32], tree: CompactRange::default(), since_checkpoint: 0 };
        return Ok(Recovered { position, segment: None, torn: None, last_signers: vec![] });
    };
    let mut data = std::fs::read(&path).map_err(|e| err(&path, e))?;
    let torn = set_aside_torn_tail(&path, &mut data)?;
    let all = lines(&data);
    let started_us = all.first().and_then(|l| parse_line(l)).and_then(|v| v["rec"]["ts"].as_str().and_then(super::time::parse_us));
    // The tree before this segment's unaccounted lines: from its last checkpoint, else from
    // the previous segment's last line (a closed segment ends with a checkpoint), else empty.
    let last_ckpt = all.iter().enumerate().rev().find_map(|(i, l)| is_checkpoint(l).map(|v| (i, v)));
    let had_checkpoint = last_ckpt.is_some();
    let (mut tree, signers, rest, mut prev_line): Start<'_> = match last_ckpt {
        Some((i, v)) => {
            let (t, s) = tree_at_checkpoint(&path, all[i], &v)?;
            (t, s, &all[i + 1..], Some(all[i].to_vec()))
        }
        None if first_seq == 0 => (CompactRange::default(), vec![], &all[..], None),
        None => {
            let (_, prev_path) = &segments[segments.len() - 2];
            let prev_data = std::fs::read(prev_path).map_err(|e| err(prev_path, e))?;
            let prev_lines = lines(&prev_data);
            let last = prev_lines.last().copied().unwrap_or_default();
            let v = is_checkpoint(last).ok_or_else(|| err(prev_path, "a closed segment does not end with a checkpoint record; run `phigate audit verify` on the trail"))?;
            let (t, s) = tree_at_checkpoint(prev_path, last, &v)?;
            (t, s, &all[..], Some(last.to_vec()))
        }
    };
    if !had_checkpoint && rest.first().and_then(|l| parse_line(l)).and_then(|v| v["seq"].as_u64()).is_some_and(|s| s != first_seq) {
        return Err(err(&path, "its first record's seq does not match its name"));
    }
    for l in rest {
        tree.append(leaf_hash(l));
    }
    if let Some(l) = rest.last() {
        prev_line = Some(l.to_vec());
    }
    let next_seq = tree.size();
    if let Some(l) = &prev_line {
        let seq = parse_line(l).and_then(|v| v["seq"].as_u64());
        if seq.map(|s| s + 1) != Some(next_seq) {
            return Err(err(&path, format!("records are not contiguous (the last line is seq {seq:?}, {next_seq} records counted); run `phigate audit verify` on the trail")));
        }
    }
    let prev = prev_line.as_deref().map(leaf_hash).unwrap_or([0; 32]);
    Ok(Recovered {
        position: Position { next_seq, prev, tree, since_checkpoint: rest.len() as u64 },
        segment: Some((path, first_seq, data.len() as u64, started_us)),
        torn,
        last_signers: signers,
    })
}
