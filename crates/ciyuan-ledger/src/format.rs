//! On-disk framing of segments, the sidecar and the checkpoints file.

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"CYLEDGER";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Segment header: magic, version, zero padding.
pub const SEGMENT_HEADER_BYTES: usize = 16;
/// Record header: length, index, CRC.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Sidecar bytes per entry: leaf hash and offset.
pub const SIDECAR_ENTRY_BYTES: usize = 40;
/// Checkpoint frame header: length, CRC.
pub const CHECKPOINT_HEADER_BYTES: usize = 8;

/// Largest entry the format holds. [`crate::LedgerOptions::max_entry_bytes`] may refuse
/// smaller ones for new appends, but recovery, readers and the verifier parse records
/// with this bound, so lowering the option never makes a written entry unreadable, or
/// a whole last record look like a torn one.
pub const MAX_ENTRY_BYTES: usize = 16 << 20;

/// The most bytes a crash may leave torn at the end of the last segment. A writer
/// never has more than this written and not yet synced (options that would allow more
/// are refused when a ledger is opened), so a longer damaged tail is damage to
/// acknowledged data. Recovery and the verifier judge a tail by this bound and
/// [`judge_torn_tail`] alone: the decision belongs to the files, not to the pipeline
/// depth or the options of whichever binary looks at them.
pub const MAX_TORN_TAIL_BYTES: u64 = 256 << 20;

/// Why the damaged end of the last segment is not what a crash leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotTorn {
    /// A signed checkpoint covers the damaged entry: it was durable when signed.
    Signed {
        /// Entries the newest checkpoint signs.
        signed_size: u64,
    },
    /// Longer than any write that was not yet synced.
    TooLong {
        /// Bytes from the damaged record to the end of the file.
        bytes: u64,
    },
    /// A valid record follows, this many bytes after the damaged one starts.
    ValidRecordFollows {
        /// Where, from the start of the damaged record.
        after: usize,
    },
}

impl std::fmt::Display for NotTorn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTorn::Signed { signed_size } => {
                write!(f, "a signed checkpoint covers {signed_size} entries")
            }
            NotTorn::TooLong { bytes } => write!(
                f,
                "{bytes} damaged bytes follow, more than a crash can leave unsynced ({MAX_TORN_TAIL_BYTES})"
            ),
            NotTorn::ValidRecordFollows { after } => {
                write!(f, "a valid record follows {after} bytes further on")
            }
        }
    }
}

/// What can be judged of a damaged tail from its length alone (so a verifier need not
/// read a tail that is too long to be torn): see [`judge_torn_tail`].
pub fn judge_torn_tail_len(bytes: u64, index: u64, signed_size: u64) -> Result<(), NotTorn> {
    if signed_size > index {
        return Err(NotTorn::Signed { signed_size });
    }
    if bytes > MAX_TORN_TAIL_BYTES {
        return Err(NotTorn::TooLong { bytes });
    }
    Ok(())
}

/// Judges the damaged end of the last segment: `tail` runs from the first record that
/// fails to parse (expected to be entry `index`) to the end of the file, and
/// `signed_size` is the size of the newest signed checkpoint (0 without one). `Ok` means
/// it is a torn write nobody was told about: recovery cuts it, the verifier reports it.
/// Anything else is damage, and both refuse it. The sidecar has no say: it is written
/// before its group is synced, so after a crash it may hold entries whose records never
/// reached the disk.
pub fn judge_torn_tail(tail: &[u8], index: u64, signed_size: u64) -> Result<(), NotTorn> {
    judge_torn_tail_len(tail.len() as u64, index, signed_size)?;
    match (1..tail.len()).find(|&off| valid_record_at(&tail[off..], index)) {
        Some(after) => Err(NotTorn::ValidRecordFollows { after }),
        None => Ok(()),
    }
}

/// Whether `b` starts with a valid record of index `index` or later.
fn valid_record_at(b: &[u8], index: u64) -> bool {
    if b.len() < RECORD_HEADER_BYTES {
        return false;
    }
    let found = u64::from_le_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]);
    found >= index && parse_record(b, found, MAX_ENTRY_BYTES).is_ok()
}

/// The segment header bytes.
pub fn segment_header() -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h
}

/// Whether `h` is a valid segment header.
pub fn check_segment_header(h: &[u8]) -> bool {
    h.len() >= SEGMENT_HEADER_BYTES && h[..SEGMENT_HEADER_BYTES] == segment_header()
}

/// CRC of a record: covers length, index and payload, so a record moved to another
/// index or cut short fails.
#[inline]
pub fn record_crc(len: u32, index: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..].copy_from_slice(&index.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Appends one framed record to `out`.
#[inline]
pub fn put_record(out: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&record_crc(len, index, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Why bytes at an offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than a header, or than the header's length says.
    Truncated,
    /// A length above the limit.
    TooLong(u32),
    /// Not the index expected here.
    WrongIndex {
        /// Index expected.
        expected: u64,
        /// Index found.
        found: u64,
    },
    /// The checksum does not match.
    Checksum,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => f.write_str("record is cut short"),
            RecordError::TooLong(n) => write!(f, "record length {n} is over the limit"),
            RecordError::WrongIndex { expected, found } => {
                write!(f, "record claims index {found}, expected {expected}")
            }
            RecordError::Checksum => f.write_str("checksum mismatch"),
        }
    }
}

/// Parses the record at the start of `buf`, expecting `index`. Returns the payload and
/// the record's total size.
#[inline]
pub fn parse_record(buf: &[u8], index: u64, max_len: usize) -> Result<(&[u8], usize), RecordError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let found = u64::from_le_bytes([
        buf[4], buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11],
    ]);
    let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if len as usize > max_len {
        return Err(RecordError::TooLong(len));
    }
    let total = RECORD_HEADER_BYTES + len as usize;
    if buf.len() < total {
        return Err(RecordError::Truncated);
    }
    let payload = &buf[RECORD_HEADER_BYTES..total];
    if record_crc(len, found, payload) != crc {
        return Err(RecordError::Checksum);
    }
    if found != index {
        return Err(RecordError::WrongIndex {
            expected: index,
            found,
        });
    }
    Ok((payload, total))
}

/// One sidecar entry.
#[inline]
pub fn put_sidecar(out: &mut Vec<u8>, leaf: &[u8; 32], offset: u64) {
    out.extend_from_slice(leaf);
    out.extend_from_slice(&offset.to_le_bytes());
}

/// Splits a sidecar entry.
#[inline]
pub fn parse_sidecar(b: &[u8]) -> ([u8; 32], u64) {
    let mut leaf = [0u8; 32];
    leaf.copy_from_slice(&b[..32]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[32..40]);
    (leaf, u64::from_le_bytes(off))
}

/// Frames a checkpoint note.
pub fn put_checkpoint(note: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKPOINT_HEADER_BYTES + note.len());
    out.extend_from_slice(&(note.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(note.as_bytes()).to_le_bytes());
    out.extend_from_slice(note.as_bytes());
    out
}

/// Largest checkpoint note a frame may hold. A note is a few hundred bytes; the bound
/// keeps a damaged length field from asking for gigabytes.
pub const MAX_CHECKPOINT_NOTE_BYTES: usize = 64 * 1024;

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole, checked note and the frame's size.
    Note(&'a str, usize),
    /// The frame goes on past the buffer (and is not over the size limit).
    Incomplete,
    /// Not a frame, and why.
    Bad(&'static str),
}

/// Parses the checkpoint frame at the start of `buf`.
pub fn parse_checkpoint_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < CHECKPOINT_HEADER_BYTES {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_CHECKPOINT_NOTE_BYTES {
        return Frame::Bad("frame cut short or too long");
    }
    let total = CHECKPOINT_HEADER_BYTES + len;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let body = &buf[CHECKPOINT_HEADER_BYTES..total];
    if crc32c::crc32c(body) != crc {
        return Frame::Bad("checksum mismatch");
    }
    match std::str::from_utf8(body) {
        Ok(s) => Frame::Note(s, total),
        Err(_) => Frame::Bad("note is not UTF-8"),
    }
}

/// Bytes read at a time while streaming a checkpoints file: many frames, and always
/// room for the largest one.
const CHECKPOINT_READ_BYTES: usize = 1 << 20;

/// Streams the frames of a checkpoints file from byte `start` (a frame boundary) to
/// byte `end`, in constant memory: `f(offset, note)` for each until it answers
/// `false`. Returns the offset and reason of the bad or cut frame that stopped the
/// scan, if one did. `io` names a read error in the caller's terms.
pub fn scan_checkpoints<E>(
    file: &std::fs::File,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, &str) -> Result<bool, E>,
    io: impl FnOnce(std::io::Error) -> E,
) -> Result<Option<(u64, &'static str)>, E> {
    use std::os::unix::fs::FileExt;
    const _: () =
        assert!(CHECKPOINT_READ_BYTES >= CHECKPOINT_HEADER_BYTES + MAX_CHECKPOINT_NOTE_BYTES);
    let mut buf = vec![0u8; CHECKPOINT_READ_BYTES];
    let mut pos = start; // file offset of buf[0]
    let mut filled = 0usize;
    loop {
        // Top the buffer up from the file.
        while filled < buf.len() && pos + (filled as u64) < end {
            let want = (buf.len() - filled).min((end - pos - filled as u64) as usize);
            match file.read_at(&mut buf[filled..filled + want], pos + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        let mut at = 0usize;
        while at < filled {
            match parse_checkpoint_frame(&buf[at..filled]) {
                Frame::Note(note, total) => {
                    if !f(pos + at as u64, note)? {
                        return Ok(None);
                    }
                    at += total;
                }
                Frame::Incomplete if at > 0 => break,
                // A whole buffer holds any valid frame: what does not fit is cut.
                Frame::Incomplete => return Ok(Some((pos, "frame cut short or too long"))),
                Frame::Bad(why) => return Ok(Some((pos + at as u64, why))),
            }
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        pos += at as u64;
    }
}

/// Segment file name for a first index.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// First index of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_fail_loudly() {
        let mut buf = Vec::new();
        put_record(&mut buf, 7, b"hello");
        assert_eq!(parse_record(&buf, 7, 100), Ok((&b"hello"[..], 21)));
        assert_eq!(
            parse_record(&buf, 8, 100),
            Err(RecordError::WrongIndex {
                expected: 8,
                found: 7
            })
        );
        assert_eq!(
            parse_record(&buf[..20], 7, 100),
            Err(RecordError::Truncated)
        );
        assert_eq!(parse_record(&buf, 7, 3), Err(RecordError::TooLong(5)));
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(parse_record(&b, 7, 100).is_err(), "flip at {i}");
        }
    }

    /// Where a bad frame stopped a scan, and why.
    type Stop = Option<(u64, &'static str)>;

    /// Every note of a checkpoints file, and where a bad frame stopped the scan.
    fn scan_all(bytes: &[u8]) -> (Vec<(u64, String)>, Stop) {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        let mut notes = Vec::new();
        let bad = scan_checkpoints(
            &f,
            0,
            bytes.len() as u64,
            |at, note| {
                notes.push((at, note.to_string()));
                Ok::<_, std::io::Error>(true)
            },
            |e| e,
        )
        .unwrap();
        (notes, bad)
    }

    #[test]
    fn checkpoint_frames() {
        let mut f = put_checkpoint("a\n\n— x y\n");
        f.extend(put_checkpoint("b\n"));
        let (notes, bad) = scan_all(&f);
        assert_eq!(notes.len(), 2);
        assert!(bad.is_none());
        let (notes, bad) = scan_all(&f[..f.len() - 1]);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            bad,
            Some((notes[0].1.len() as u64 + 8, "frame cut short or too long"))
        );
        // Many frames, across the read buffer's edge, in order.
        let mut many = Vec::new();
        for i in 0..20_000 {
            many.extend(put_checkpoint(&format!("note {i}\n")));
        }
        let (notes, bad) = scan_all(&many);
        assert!(bad.is_none());
        assert_eq!(notes.len(), 20_000);
        assert_eq!(notes[12_345].1, "note 12345\n");
    }

    #[test]
    fn torn_tails_are_judged_by_the_format() {
        let mut next = Vec::new();
        put_record(&mut next, 9, b"later");
        let mut tail = vec![0xAB; 100];
        assert_eq!(judge_torn_tail(&tail, 7, 7), Ok(()));
        assert_eq!(
            judge_torn_tail(&tail, 7, 8),
            Err(NotTorn::Signed { signed_size: 8 })
        );
        tail.extend_from_slice(&next);
        assert_eq!(
            judge_torn_tail(&tail, 7, 0),
            Err(NotTorn::ValidRecordFollows { after: 100 })
        );
        // A record of an earlier index is old garbage, not a later write.
        assert_eq!(judge_torn_tail(&tail, 10, 0), Ok(()));
        assert_eq!(judge_torn_tail_len(MAX_TORN_TAIL_BYTES, 7, 0), Ok(()));
        assert_eq!(
            judge_torn_tail_len(MAX_TORN_TAIL_BYTES + 1, 7, 0),
            Err(NotTorn::TooLong {
                bytes: MAX_TORN_TAIL_BYTES + 1
            })
        );
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
    }
}
