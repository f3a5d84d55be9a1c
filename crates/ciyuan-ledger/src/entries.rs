//! Reading the entries of a ledger directory or an audit bundle offline, in order, for
//! checks that look at what entries say rather than at their bytes.
//!
//! Meant to run after [`crate::verify_path`] has vouched for the bytes: it frames and
//! checksums records again (a file may change between the two passes), but judges no
//! torn tail and no tree. It takes no lock and writes nothing, so it reads a ledger
//! a server is running on, up to the size the verifier reported.

use crate::bundle::ENTRIES_FILE;
use crate::format::{
    MAX_ENTRY_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, check_segment_header, parse_record,
    parse_segment_name,
};
use crate::verify::VerifyFailure;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Read buffer per file: large reads, memory independent of the log's length.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// Calls `f` with the index and bytes of each of the first `count` entries of a ledger
/// directory (it has `segments/`) or a bundle (it has `entries.jsonl`), in log order,
/// and stops at the first error `f` returns. Memory holds one entry at a time.
///
/// Fewer than `count` entries, a record that does not frame or checksum, or a
/// segment that does not start where the previous one ended is a [`VerifyFailure`]
/// naming the file and entry.
pub fn for_each_entry<E: From<VerifyFailure>>(
    path: &Path,
    count: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    if path.join("segments").is_dir() {
        ledger_entries(path, count, &mut f)
    } else if path.join(ENTRIES_FILE).is_file() {
        bundle_entries(path, count, &mut f)
    } else {
        Err(failure(format!(
            "{} is neither a ledger directory (segments/) nor an audit bundle ({ENTRIES_FILE})",
            path.display()
        )))
    }
}

fn failure<E: From<VerifyFailure>>(msg: String) -> E {
    E::from(VerifyFailure(msg))
}

fn ledger_entries<E: From<VerifyFailure>>(
    dir: &Path,
    count: u64,
    f: &mut impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let seg_dir = dir.join("segments");
    let listing = std::fs::read_dir(&seg_dir)
        .map_err(|e| failure::<E>(format!("reading {}: {e}", seg_dir.display())))?;
    let mut firsts = Vec::new();
    for item in listing {
        let item = item.map_err(|e| failure::<E>(format!("reading {}: {e}", seg_dir.display())))?;
        if let Some(first) = item.file_name().to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let mut index = 0u64;
    let mut payload = Vec::new();
    for (i, &first) in firsts.iter().enumerate() {
        if index >= count {
            break;
        }
        let name = crate::format::segment_name(first);
        if first != index {
            return Err(failure(format!(
                "segments/{name}: starts at entry {first}, but the previous segments end at {index}"
            )));
        }
        let file = File::open(seg_dir.join(&name))
            .map_err(|e| failure::<E>(format!("segments/{name}: {e}")))?;
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        r.read_exact(&mut header)
            .map_err(|e| failure::<E>(format!("segments/{name}: header: {e}")))?;
        if !check_segment_header(&header) {
            return Err(failure(format!("segments/{name}: not a segment header")));
        }
        let stop = match firsts.get(i + 1) {
            Some(&next) => next.min(count),
            None => count,
        };
        let mut offset = SEGMENT_HEADER_BYTES as u64;
        while index < stop {
            let mut head = [0u8; RECORD_HEADER_BYTES];
            r.read_exact(&mut head).map_err(|e| {
                failure::<E>(format!(
                    "segments/{name} offset {offset} (entry {index}): record header: {e}"
                ))
            })?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > MAX_ENTRY_BYTES {
                return Err(failure(format!(
                    "segments/{name} offset {offset} (entry {index}): record length {len} is over the limit"
                )));
            }
            payload.clear();
            payload.extend_from_slice(&head);
            payload.resize(RECORD_HEADER_BYTES + len, 0);
            r.read_exact(&mut payload[RECORD_HEADER_BYTES..])
                .map_err(|e| {
                    failure::<E>(format!(
                        "segments/{name} offset {offset} (entry {index}): record: {e}"
                    ))
                })?;
            let (entry, total) = parse_record(&payload, index, MAX_ENTRY_BYTES).map_err(|why| {
                failure::<E>(format!(
                    "segments/{name} offset {offset} (entry {index}): {why}"
                ))
            })?;
            f(index, entry)?;
            offset += total as u64;
            index += 1;
        }
    }
    if index < count {
        return Err(failure(format!(
            "{}: holds {index} entries, {count} expected",
            seg_dir.display()
        )));
    }
    Ok(())
}

fn bundle_entries<E: From<VerifyFailure>>(
    dir: &Path,
    count: u64,
    f: &mut impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let file = File::open(dir.join(ENTRIES_FILE))
        .map_err(|e| failure::<E>(format!("{ENTRIES_FILE}: {e}")))?;
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    let mut line = Vec::new();
    for index in 0..count {
        line.clear();
        // One line is one entry: bounded like a record, plus its newline.
        let n = (&mut r)
            .take(MAX_ENTRY_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| failure::<E>(format!("{ENTRIES_FILE} line {}: {e}", index + 1)))?;
        if n == 0 {
            return Err(failure(format!(
                "{ENTRIES_FILE}: holds {index} entries, {count} expected"
            )));
        }
        let Some(entry) = line.strip_suffix(b"\n") else {
            return Err(failure(format!(
                "{ENTRIES_FILE} line {} (entry {index}): no newline within {MAX_ENTRY_BYTES} bytes",
                index + 1
            )));
        };
        f(index, entry)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::{BundleWriter, Ledger, LedgerOptions};

    fn entries(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(i % 50)).into_bytes())
            .collect()
    }

    fn read_all(path: &Path, count: u64) -> Result<Vec<(u64, Vec<u8>)>, VerifyFailure> {
        let mut out = Vec::new();
        for_each_entry::<VerifyFailure>(path, count, |i, b| {
            out.push((i, b.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn reads_every_entry_across_segments_and_from_a_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let opts = LedgerOptions {
            // Small segments, so the entries span several.
            segment_max_bytes: 4096,
            ..LedgerOptions::default()
        };
        let want = entries(300);
        let mut ledger = Ledger::open(&dir, opts).unwrap();
        for chunk in want.chunks(7) {
            ledger.append_batch(chunk).unwrap();
        }
        ledger.checkpoint().unwrap();
        let vkey = ledger.reader().verifier_key().to_string();
        let reader = ledger.reader();
        drop(ledger);
        let segments = std::fs::read_dir(dir.join("segments")).unwrap().count();
        assert!(segments > 3, "only {segments} segments");

        let got = read_all(&dir, 300).unwrap();
        assert_eq!(got.len(), 300);
        for (i, (index, bytes)) in got.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(bytes, &want[i]);
        }
        // A prefix reads only the prefix.
        assert_eq!(read_all(&dir, 10).unwrap().len(), 10);
        // More than the log holds is a failure, not a short read.
        let err = read_all(&dir, 301).unwrap_err();
        assert!(err.0.contains("(entry 300): record header"), "{err}");

        let bundle = tmp.path().join("bundle");
        let mut w = BundleWriter::create(&bundle, &vkey).unwrap();
        reader
            .scan::<crate::LedgerError>(0..300, |_, b| w.entry(b))
            .unwrap();
        w.finish().unwrap();
        assert_eq!(read_all(&bundle, 300).unwrap(), got);
        let err = read_all(&bundle, 301).unwrap_err();
        assert!(err.0.contains("holds 300 entries, 301 expected"), "{err}");
    }

    #[test]
    fn a_changed_record_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let mut ledger = Ledger::open(&dir, LedgerOptions::default()).unwrap();
        ledger.append_batch(&entries(5)).unwrap();
        drop(ledger);
        let seg = dir.join("segments").join(crate::format::segment_name(0));
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let err = read_all(&dir, 5).unwrap_err();
        assert!(err.0.contains("(entry 4): checksum mismatch"), "{err}");
        assert!(err.0.contains("00000000000000000000.seg"), "{err}");
    }

    #[test]
    fn the_callers_error_stops_the_walk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let mut ledger = Ledger::open(&dir, LedgerOptions::default()).unwrap();
        ledger.append_batch(&entries(5)).unwrap();
        drop(ledger);
        let mut seen = 0;
        let err = for_each_entry::<VerifyFailure>(&dir, 5, |i, _| {
            seen += 1;
            if i == 2 {
                return Err(VerifyFailure("stop at 2".into()));
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.0, "stop at 2");
        assert_eq!(seen, 3);
    }
}
