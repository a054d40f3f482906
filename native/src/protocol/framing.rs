//! Cuts PostgreSQL wire messages out of a growable per-connection buffer, checking every length
//! before anything is allocated for it.

use bytes::{Buf, BytesMut};

/// A length field below 4 cannot describe a valid message (the length counts itself).
pub const MIN_LENGTH: usize = 4;
/// Startup packets are small; PostgreSQL itself caps them at 10,000 bytes.
pub const MAX_STARTUP_LENGTH: usize = 10_000;

/// Why a byte stream is not a valid sequence of messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below 4.
    LengthTooSmall { tag: u8, length: u32 },
    /// The length field exceeds what we are willing to buffer for this message type.
    TooLarge { tag: u8, length: usize, limit: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::LengthTooSmall { tag, length } => {
                write!(f, "message type 0x{tag:02x} has invalid length {length}")
            }
            FrameError::TooLarge { tag, length, limit } => write!(
                f,
                "message type 0x{tag:02x} of {length} bytes exceeds the limit of {limit} bytes"
            ),
        }
    }
}

/// The header of a regular (tagged) message: tag and total size on the wire (1 + length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Value of the length field (includes the 4 length bytes, excludes the tag).
    pub length: usize,
}

impl Header {
    /// Size of the whole message on the wire.
    pub fn wire_len(&self) -> usize {
        self.length + 1
    }
    pub fn body_len(&self) -> usize {
        self.length - 4
    }
}

/// Reads the header at the start of `buf` if 5 bytes are present. Fails on a length below 4.
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let length = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if (length as usize) < MIN_LENGTH {
        return Err(FrameError::LengthTooSmall { tag, length });
    }
    Ok(Some(Header { tag, length: length as usize }))
}

/// A complete tagged message cut from the buffer: its tag and the whole wire bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The whole message including tag and length (zero-copy slice of the read buffer).
    pub bytes: bytes::Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Cuts the next complete message from `buf`, or returns None if more bytes are needed.
/// Smallest step a partial message's buffer grows by.
const MIN_GROWTH: usize = 8192;

/// `limit` caps the length we agree to buffer; the caller decides per message type.
pub fn next_frame(
    buf: &mut BytesMut,
    limit: impl Fn(u8) -> usize,
) -> Result<Option<Frame>, FrameError> {
    let Some(h) = peek_header(buf)? else { return Ok(None) };
    let lim = limit(h.tag);
    if h.length > lim {
        return Err(FrameError::TooLarge { tag: h.tag, length: h.length, limit: lim });
    }
    if buf.len() < h.wire_len() {
        // Grow toward the announced length only as bytes arrive (at most doubling what is
        // buffered): a 5-byte header announcing max_message_bytes must not make the gateway
        // allocate that much for a client that never sends it.
        let missing = h.wire_len() - buf.len();
        buf.reserve(missing.min(buf.len().max(MIN_GROWTH)));
        return Ok(None);
    }
    let bytes = buf.split_to(h.wire_len()).freeze();
    Ok(Some(Frame { tag: h.tag, bytes }))
}

/// What the client→upstream half takes from the client's bytes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// A whole message.
    Frame(Frame),
    /// Part of a CopyData message, streamed through without waiting for the rest (large COPY IN
    /// rows are never buffered whole).
    Stream(bytes::Bytes),
    /// A Query or Parse longer than the statement limit was read and dropped (its tag).
    Discarded(u8),
}

/// Cuts the client's stream after startup: CopyData streams through, an oversized Query or
/// Parse is discarded as it arrives (its text is never buffered), everything else comes whole.
#[derive(Debug)]
pub struct ClientCutter {
    max_statement: usize,
    max_message: usize,
    /// Bytes of a CopyData message still to stream through.
    pass_remaining: usize,
    /// Bytes of an oversized Query/Parse still to discard, and which it was.
    discard_remaining: usize,
    discard_tag: u8,
}

impl ClientCutter {
    pub fn new(max_statement: usize, max_message: usize) -> Self {
        ClientCutter { max_statement, max_message, pass_remaining: 0, discard_remaining: 0, discard_tag: 0 }
    }

    /// The next cut, or None when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Cut>, FrameError> {
        loop {
            if self.pass_remaining > 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = self.pass_remaining.min(buf.len());
                self.pass_remaining -= take;
                return Ok(Some(Cut::Stream(buf.split_to(take).freeze())));
            }
            if self.discard_remaining > 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = self.discard_remaining.min(buf.len());
                buf.advance(take);
                self.discard_remaining -= take;
                if self.discard_remaining == 0 {
                    return Ok(Some(Cut::Discarded(self.discard_tag)));
                }
                continue;
            }
            let Some(h) = peek_header(buf)? else { return Ok(None) };
            if h.length > self.max_message {
                return Err(FrameError::TooLarge { tag: h.tag, length: h.length, limit: self.max_message });
            }
            match h.tag {
                b'd' => self.pass_remaining = h.wire_len(),
                b'Q' | b'P' if h.body_len() > self.max_statement => {
                    self.discard_remaining = h.wire_len();
                    self.discard_tag = h.tag;
                }
                _ => return next_frame(buf, |_| self.max_message).map(|f| f.map(Cut::Frame)),
            }
        }
    }
}

/// Cuts an untagged startup-phase packet (StartupMessage, SSLRequest, CancelRequest...).
pub fn next_startup_packet(buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length < 8 {
        return Err(FrameError::LengthTooSmall { tag: 0, length: length as u32 });
    }
    if length > MAX_STARTUP_LENGTH {
        return Err(FrameError::TooLarge { tag: 0, length, limit: MAX_STARTUP_LENGTH });
    }
    if buf.len() < length {
        return Ok(None);
    }
    let mut pkt = buf.split_to(length);
    pkt.advance(4);
    Ok(Some(pkt))
}

/// Reads a NUL-terminated string from `body` at `*pos`, advancing past the NUL.
pub fn read_cstr<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = body.get(*pos..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let s = &rest[..nul];
    *pos += nul + 1;
    Some(s)
}

pub fn read_i16(body: &[u8], pos: &mut usize) -> Option<i16> {
    let b = body.get(*pos..*pos + 2)?;
    *pos += 2;
    Some(i16::from_be_bytes([b[0], b[1]]))
}

pub fn read_i32(body: &[u8], pos: &mut usize) -> Option<i32> {
    let b = body.get(*pos..*pos + 4)?;
    *pos += 4;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn cut_all(chunks: &[Vec<u8>]) -> Vec<(u8, Vec<u8>)> {
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(f) = next_frame(&mut buf, |_| 1 << 20).unwrap() {
                out.push((f.tag, f.body().to_vec()));
            }
        }
        assert!(buf.is_empty(), "leftover bytes after a complete stream");
        out
    }

    #[test]
    fn rejects_length_below_four() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            next_frame(&mut buf, |_| 100),
            Err(FrameError::LengthTooSmall { tag: b'Q', length: 3 })
        );
    }

    #[test]
    fn rejects_oversized_before_buffering() {
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0, 0, 0][..]);
        assert!(matches!(next_frame(&mut buf, |_| 1000), Err(FrameError::TooLarge { .. })));
        // Nothing was reserved for the claimed 2 GB.
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn an_announced_length_is_not_reserved_before_its_bytes_arrive() {
        // A header announcing 64 MiB (within the limit) with nothing after it.
        let mut buf = BytesMut::from(&[b'Q', 0x04, 0, 0, 0][..]);
        assert_eq!(next_frame(&mut buf, |_| 1 << 27), Ok(None));
        assert!(buf.capacity() < 64 * 1024, "reserved {} bytes for 5 received", buf.capacity());
        // As the body arrives, the buffer grows with it, and the message is cut whole at the end.
        let body = vec![b'x'; (1 << 26) - 4];
        let mut sent = 0;
        let mut frame = None;
        while frame.is_none() {
            let n = (body.len() - sent).min(1 << 20);
            buf.extend_from_slice(&body[sent..sent + n]);
            sent += n;
            assert!(buf.capacity() <= 4 * buf.len() + (1 << 20), "over-reserved at {} bytes", buf.len());
            frame = next_frame(&mut buf, |_| 1 << 27).unwrap();
        }
        assert_eq!(frame.unwrap().body().len(), body.len());
    }

    #[test]
    fn startup_packet_limits() {
        let mut buf = BytesMut::from(&[0, 0, 0, 4, 0, 0, 0, 0][..]);
        assert!(next_startup_packet(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 1, 0, 0][..]);
        assert!(next_startup_packet(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 47][..]);
        let pkt = next_startup_packet(&mut buf).unwrap().unwrap();
        assert_eq!(&pkt[..], &[4, 210, 22, 47]);
    }

    /// A stream for the client cutter: valid messages of every kind, lengths that lie, garbage.
    fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
        let tag = prop_oneof![
            prop::sample::select(b"QPBEDCSHdcfXF".to_vec()),
            any::<u8>(),
        ];
        let piece = prop_oneof![
            6 => (tag.clone(), proptest::collection::vec(any::<u8>(), 0..120)).prop_map(|(t, b)| msg(t, &b)),
            1 => (tag, any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(t, len, rest)| {
                let mut v = vec![t];
                v.extend_from_slice(&(len % 300).to_be_bytes());
                v.extend(rest);
                v
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..12),
        ];
        proptest::collection::vec(piece, 0..25).prop_map(|ps| ps.concat())
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Frame(Vec<u8>),
        Stream(Vec<u8>),
        Discarded(u8),
    }

    /// Feeds `chunks` to a cutter, checking every cut against the input at its offset; returns
    /// what was seen (consecutive stream pieces merged), the error if any and the bytes consumed.
    fn run_cutter(input: &[u8], chunks: &[&[u8]], max_statement: usize, max_message: usize) -> (Vec<Seen>, Option<FrameError>, usize) {
        let mut cutter = ClientCutter::new(max_statement, max_message);
        let mut buf = BytesMut::new();
        let mut seen: Vec<Seen> = vec![];
        let mut offset = 0usize;
        // Bytes of the CopyData message being streamed still to come.
        let mut copy_remaining = 0usize;
        for c in chunks {
            buf.extend_from_slice(c);
            loop {
                match cutter.next(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(Cut::Frame(f))) => {
                        assert_eq!(copy_remaining, 0);
                        let h = peek_header(&input[offset..]).unwrap().unwrap();
                        assert_eq!(f.bytes.len(), h.wire_len());
                        assert_eq!(&f.bytes[..], &input[offset..offset + h.wire_len()]);
                        assert!(f.tag != b'd' && f.bytes.len() - 1 <= max_message);
                        offset += f.bytes.len();
                        seen.push(Seen::Frame(f.bytes.to_vec()));
                    }
                    Ok(Some(Cut::Stream(d))) => {
                        assert!(!d.is_empty());
                        if copy_remaining == 0 {
                            let h = peek_header(&input[offset..]).unwrap().unwrap();
                            assert_eq!(h.tag, b'd');
                            copy_remaining = h.wire_len();
                        }
                        assert!(d.len() <= copy_remaining);
                        assert_eq!(&d[..], &input[offset..offset + d.len()]);
                        copy_remaining -= d.len();
                        offset += d.len();
                        match seen.last_mut() {
                            Some(Seen::Stream(s)) => s.extend_from_slice(&d),
                            _ => seen.push(Seen::Stream(d.to_vec())),
                        }
                    }
                    Ok(Some(Cut::Discarded(t))) => {
                        assert_eq!(copy_remaining, 0);
                        let h = peek_header(&input[offset..]).unwrap().unwrap();
                        assert!(h.tag == t && matches!(t, b'Q' | b'P') && h.body_len() > max_statement && h.length <= max_message);
                        offset += h.wire_len();
                        seen.push(Seen::Discarded(t));
                    }
                    Err(e) => return (seen, Some(e), offset),
                }
            }
        }
        // Whatever was not cut is still buffered (or was partly streamed or discarded).
        assert!(offset + buf.len() <= input.len());
        (seen, None, offset)
    }

    proptest! {
        /// The relay's framing of hostile client bytes: no panic, every message boundary where
        /// the length fields put it, and the same cuts whatever the chunking of the reads.
        #[test]
        fn client_cutter_is_chunking_independent(
            input in hostile_stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
            max_statement in 0usize..200,
            max_message in 4usize..300,
        ) {
            let whole = run_cutter(&input, &[&input], max_statement, max_message);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            points.sort();
            let mut chunks: Vec<&[u8]> = vec![];
            let mut last = 0;
            for p in points {
                chunks.push(&input[last..p]);
                last = p;
            }
            chunks.push(&input[last..]);
            let chunked = run_cutter(&input, &chunks, max_statement, max_message);
            prop_assert_eq!(whole, chunked);
        }
    }

    proptest! {
        #[test]
        fn any_split_yields_same_messages(
            bodies in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let mut stream = vec![];
            for (t, b) in &bodies { stream.extend(msg(*t, b)); }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.sort();
            let mut chunks = vec![];
            let mut last = 0;
            for p in points { chunks.push(stream[last..p].to_vec()); last = p; }
            chunks.push(stream[last..].to_vec());
            let expected: Vec<(u8, Vec<u8>)> = bodies.clone();
            prop_assert_eq!(cut_all(&chunks), expected);
        }
    }
}
