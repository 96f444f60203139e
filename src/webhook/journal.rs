//! The outbox's journal: `DATA_DIR/outbox.journal`, an append-only file that makes a webhook
//! durable before it is answered 200.
//!
//! Each group of accepted webhooks is one `write` and (with `OUTBOX_SYNC=full`) one
//! `fdatasync`: about 0.25 ms on an ordinary disk, against about 1 ms for a SQLite commit
//! of the same group, whose B-tree pages (the random deduplication keys above all) make it
//! write ten times the bytes. The outbox database is then brought up to date from the same
//! group without waiting for the disk; after a crash, [`Journal::open`] hands back what the
//! database may have missed, and the outbox applies every entry past its `applied_seq`.
//!
//! Layout: frames, each `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`; the
//! payload is a protobuf message ([`encode`]) whose first field is a sequence number that grows
//! by one per entry. Reading stops at the first frame that is short, fails its CRC, or breaks
//! the sequence: that is the torn end of a write the crash interrupted, never answered 200.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::webhook::normalize::Received;
use crate::webhook::outbox::Record;

/// File name of the journal inside `DATA_DIR`.
pub const JOURNAL_FILE: &str = "outbox.journal";

const HEADER: usize = 8;

/// The largest payload a frame may declare: a body of at most 8 MiB plus its fields, with
/// room to spare. Anything larger is a torn or foreign frame.
const MAX_PAYLOAD: u32 = 16 << 20;

/// One entry as read back: its sequence number and the webhook it recorded.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    /// Grows by one per entry, across restarts.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// SHA-256 of the raw body.
    #[prost(bytes = "vec", tag = "2")]
    pub body_hash: Vec<u8>,
    /// Connection ids to deliver to.
    #[prost(string, repeated, tag = "3")]
    pub destinations: Vec<String>,
    /// When the webhook was received (Unix ms).
    #[prost(int64, tag = "4")]
    pub received_ms: i64,
    /// Zoom's `event`.
    #[prost(string, tag = "5")]
    pub event_type: String,
    /// Request metadata (account id, Zoom's request and trace ids).
    #[prost(map = "string, string", tag = "6")]
    pub memo: HashMap<String, String>,
    /// The raw body, exactly as received.
    #[prost(bytes = "vec", tag = "7")]
    pub body: Vec<u8>,
}

impl Entry {
    /// The webhook this entry recorded, as the outbox records it.
    pub fn into_record(self) -> (u64, Record) {
        let mut body_hash = [0u8; 32];
        if self.body_hash.len() == 32 {
            body_hash.copy_from_slice(&self.body_hash);
        }
        (
            self.seq,
            Record {
                body_hash,
                destinations: self.destinations,
                received: Received {
                    event_type: self.event_type,
                    memo: self.memo,
                    received_ms: self.received_ms,
                    body: self.body,
                },
            },
        )
    }
}

/// Appends the frame of `record` as entry `seq` to `out`, in the layout [`Entry`] reads.
/// Encoded from borrowed fields: the body is copied once, into `out`.
pub fn encode(seq: u64, record: &Record, out: &mut Vec<u8>) {
    use prost::encoding::{bytes, hash_map, int64, string, uint64};
    let r = &record.received;
    let hash = record.body_hash.to_vec();
    let len = uint64::encoded_len(1, &seq)
        + bytes::encoded_len(2, &hash)
        + string::encoded_len_repeated(3, &record.destinations)
        + int64::encoded_len(4, &r.received_ms)
        + string::encoded_len(5, &r.event_type)
        + hash_map::encoded_len(string::encoded_len, string::encoded_len, 6, &r.memo)
        + bytes::encoded_len(7, &r.body);
    let start = out.len();
    out.reserve(HEADER + len);
    out.extend_from_slice(&[0; HEADER]);
    uint64::encode(1, &seq, out);
    bytes::encode(2, &hash, out);
    string::encode_repeated(3, &record.destinations, out);
    int64::encode(4, &r.received_ms, out);
    string::encode(5, &r.event_type, out);
    hash_map::encode(
        string::encode,
        string::encoded_len,
        string::encode,
        string::encoded_len,
        6,
        &r.memo,
        out,
    );
    bytes::encode(7, &r.body, out);
    let payload = &out[start + HEADER..];
    let crc = crc32fast::hash(payload);
    let size = payload.len() as u32;
    out[start..start + 4].copy_from_slice(&size.to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The journal file, open for appending at the end of its valid frames.
pub struct Journal {
    file: File,
    path: PathBuf,
    len: u64,
    sync: bool,
}

impl Journal {
    /// Opens (creating if needed) the journal in `data_dir`; `sync` makes every append wait
    /// for the disk. Returns it with every valid entry in it, in order; a torn end is cut off.
    pub fn open(data_dir: &Path, sync: bool) -> io::Result<(Self, Vec<Entry>)> {
        let path = data_dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Bodies name accounts and people: keep them to this user.
            .mode(0o600)
            .open(&path)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes)?;
        let (entries, valid) = decode_all(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                kept = entries.len(),
                cut_bytes = bytes.len() - valid,
                "the outbox journal ends with an incomplete write (a crash while recording, never answered 200): cut off"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok((
            Self {
                file,
                path,
                len: valid as u64,
                sync,
            },
            entries,
        ))
    }

    /// Appends whole frames (from [`encode`]) in one write, then waits for the disk if this
    /// journal syncs. On failure nothing counts as written: the next append overwrites it.
    pub fn append(&mut self, frames: &[u8]) -> io::Result<()> {
        let written = self.file.write_all_at(frames, self.len).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: a torn frame left behind is cut off when the journal is next
                // opened, or overwritten by the next append.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Empties the journal, once everything in it is durably elsewhere.
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    /// Bytes of valid frames in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the journal holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The journal's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The valid entries at the start of `bytes`, and how many bytes they take.
fn decode_all(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut pos = 0;
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let size = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if size == 0 || size > MAX_PAYLOAD {
            break;
        }
        let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + size as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(entry) = Entry::decode(payload) else {
            break;
        };
        if entries.last().is_some_and(|last| entry.seq != last.seq + 1) {
            break;
        }
        entries.push(entry);
        pos += HEADER + size as usize;
    }
    (entries, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &str) -> Record {
        use sha2::Digest;
        Record {
            body_hash: sha2::Sha256::digest(body.as_bytes()).into(),
            destinations: vec!["con_a".into(), "con_b".into()],
            received: Received {
                event_type: "meeting.started".into(),
                memo: HashMap::from([("account_id".into(), "acc".into())]),
                received_ms: 1_700_000_000_123,
                body: body.as_bytes().to_vec(),
            },
        }
    }

    #[test]
    fn entries_read_back_exactly_as_appended() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, entries) = Journal::open(dir.path(), true).unwrap();
        assert!(entries.is_empty() && journal.is_empty());
        let bodies = ["{\"topic\":\"Zdeněk Ødegård\"}", "{}", "{\"n\":3}"];
        let mut frames = Vec::new();
        for (seq, body) in (7..).zip(bodies) {
            encode(seq, &record(body), &mut frames);
        }
        journal.append(&frames[..]).unwrap();
        drop(journal);

        let (journal, entries) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(journal.len(), frames.len() as u64);
        let read: Vec<(u64, Record)> = entries.into_iter().map(Entry::into_record).collect();
        assert_eq!(read.len(), 3);
        for ((seq, r), (want_seq, body)) in read.iter().zip((7..).zip(bodies)) {
            let want = record(body);
            assert_eq!(*seq, want_seq);
            assert_eq!(r.body_hash, want.body_hash);
            assert_eq!(r.destinations, want.destinations);
            assert_eq!(r.received.body, want.received.body);
            assert_eq!(r.received.event_type, want.received.event_type);
            assert_eq!(r.received.memo, want.received.memo);
            assert_eq!(r.received.received_ms, want.received.received_ms);
        }
    }

    #[test]
    fn a_torn_end_is_cut_off_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), true).unwrap();
        let mut frames = Vec::new();
        encode(1, &record("{\"a\":1}"), &mut frames);
        encode(2, &record("{\"a\":2}"), &mut frames);
        journal.append(&frames).unwrap();
        let whole = journal.len();
        drop(journal);
        // A crash in the middle of the next write: half a frame at the end.
        let mut torn = Vec::new();
        encode(3, &record("{\"a\":3}"), &mut torn);
        let file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        file.write_all_at(&torn[..torn.len() / 2], whole).unwrap();
        drop(file);

        let (mut journal, entries) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(journal.len(), whole, "the torn half is gone");
        journal.append(&torn).unwrap();
        drop(journal);
        let (_, entries) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn damaged_or_out_of_sequence_frames_end_the_journal() {
        let mut frames = Vec::new();
        encode(1, &record("{\"a\":1}"), &mut frames);
        let first = frames.len();
        encode(2, &record("{\"a\":2}"), &mut frames);
        let (entries, valid) = decode_all(&frames);
        assert_eq!((entries.len(), valid), (2, frames.len()));

        let mut flipped = frames.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode_all(&flipped).1,
            first,
            "a changed byte fails the CRC"
        );

        let mut skipped = frames[..first].to_vec();
        encode(5, &record("{\"a\":5}"), &mut skipped);
        assert_eq!(decode_all(&skipped).1, first, "a gap in the sequence");

        let mut huge = frames[..first].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(decode_all(&huge).1, first, "an impossible length");

        // A crash can leave the end of a file zero-filled: an empty frame with a matching CRC.
        let mut zeros = frames[..first].to_vec();
        zeros.extend_from_slice(&[0; 64]);
        assert_eq!(decode_all(&zeros).1, first, "zeros");
        assert_eq!(decode_all(&[0; 64]), (Vec::new(), 0));
    }

    #[test]
    fn reset_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), false).unwrap();
        let mut frames = Vec::new();
        encode(1, &record("{}"), &mut frames);
        journal.append(&frames).unwrap();
        journal.reset().unwrap();
        assert!(journal.is_empty());
        drop(journal);
        let (_, entries) = Journal::open(dir.path(), false).unwrap();
        assert!(entries.is_empty());
    }
}
