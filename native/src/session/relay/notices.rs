//! Writing the control plane's notices to the client: a notice with a key goes out at most once
//! per session, one without a key every time.

use bytes::BytesMut;
use std::collections::HashSet;
use std::sync::Arc;

use crate::cache::Notice;

/// Keys remembered per session; past this the set starts over (a notice sent twice is harmless,
/// unbounded memory is not). Keys name relations, so real sessions stay far below it.
const MAX_KEYS: usize = 4096;

#[derive(Default)]
pub(super) struct SentNotices {
    keys: HashSet<Arc<str>>,
}

impl SentNotices {
    /// Appends the notices of `due` not sent yet to `out`.
    pub(super) fn write(&mut self, due: &[Notice], out: &mut BytesMut) {
        for n in due {
            if let Some(key) = &n.key {
                if self.keys.contains(key) {
                    continue;
                }
                if self.keys.len() >= MAX_KEYS {
                    self.keys.clear();
                }
                self.keys.insert(key.clone());
            }
            out.extend_from_slice(&n.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn n(key: Option<&str>, text: &'static [u8]) -> Notice {
        Notice { key: key.map(Arc::from), message: Bytes::from_static(text) }
    }

    #[test]
    fn keyed_notices_go_out_once_unkeyed_every_time() {
        let mut sent = SentNotices::default();
        let mut out = BytesMut::new();
        let first = [n(Some("public.patients"), b"P"), n(None, b"x")];
        sent.write(&first, &mut out);
        sent.write(&first, &mut out);
        sent.write(&[n(Some("public.notes"), b"Q"), n(Some("public.patients"), b"P")], &mut out);
        assert_eq!(&out[..], b"PxxQ");
    }

    #[test]
    fn the_key_set_is_bounded() {
        let mut sent = SentNotices::default();
        let mut out = BytesMut::new();
        for i in 0..MAX_KEYS + 10 {
            sent.write(&[n(Some(&i.to_string()), b"")], &mut out);
        }
        assert!(sent.keys.len() <= MAX_KEYS);
    }
}
