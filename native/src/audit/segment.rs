//! Segment files in the trail directory: `segment-<first seq, 12 digits>.jsonl`, append-only,
//! one record per line; listing, creating, reopening, and durable directory changes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub fn segment_name(first_seq: u64) -> String {
    format!("segment-{first_seq:012}.jsonl")
}

/// The first seq a segment file name stands for (None for any other file, torn tails included).
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".jsonl")?;
    (digits.len() >= 12 && digits.bytes().all(|c| c.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Every segment in `dir`, by first seq.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Makes a file creation, rename or removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being written: its file, and how much of it holds complete, accounted lines
/// (after a failed write, everything past `good_len` is cut before writing again).
pub struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub good_len: u64,
    /// When its first record was written (µs since the epoch), for rotation by age.
    pub started_us: i64,
    file: File,
}

impl Segment {
    /// A new, empty segment whose first record will be `first_seq`; the directory entry is
    /// made durable before anything is written to it.
    pub fn create(dir: &Path, first_seq: u64, now_us: i64) -> std::io::Result<Segment> {
        let path = dir.join(segment_name(first_seq));
        // Records are readable by the service's group only: they name subjects and peers.
        let file = OpenOptions::new().append(true).create(true).mode(0o640).open(&path)?;
        sync_dir(dir)?;
        let good_len = file.metadata()?.len();
        Ok(Segment { path, first_seq, good_len, started_us: now_us, file })
    }

    /// Reopens an existing segment to append after its `good_len` bytes.
    pub fn reopen(path: PathBuf, first_seq: u64, good_len: u64, started_us: i64) -> std::io::Result<Segment> {
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Segment { path, first_seq, good_len, started_us, file })
    }

    /// Appends whole lines; on error the file may hold part of them (see `cut`).
    pub fn write(&mut self, lines: &[u8]) -> std::io::Result<()> {
        self.file.write_all(lines)?;
        self.good_len += lines.len() as u64;
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Removes whatever a failed write left after the last complete line.
    pub fn cut(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() != self.good_len {
            self.file.set_len(self.good_len)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(42), "segment-000000000042.jsonl");
        assert_eq!(parse_segment_name("segment-000000000042.jsonl"), Some(42));
        assert_eq!(parse_segment_name("segment-000000000042.jsonl.torn-1700000000"), None);
        assert_eq!(parse_segment_name("checkpoint"), None);
    }
}
