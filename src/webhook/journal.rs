//! The journal of earlier versions, `DATA_DIR/outbox.journal`: an append-only file that made
//! a webhook durable before the outbox database had it. The outbox now commits to its database
//! directly; at start it applies what such a file holds beyond the database, then removes it
//! (see [`crate::webhook::outbox`]), so an upgrade loses nothing that was answered 200.
//!
//! Layout: frames, each `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`; the
//! payload is a protobuf message ([`Entry`]) whose first field is a sequence number that grows
//! by one per entry. Reading stops at the first frame that is short, fails its CRC, or breaks
//! the sequence: that is the torn end of a write a crash interrupted, never answered 200.

use std::collections::HashMap;
use std::io;
use std::path::Path;

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
                signed_at_ms: 0,
            },
        )
    }
}

/// Every valid entry of the journal in `data_dir` (none if there is no journal), in order;
/// a torn end is left out.
pub fn read(data_dir: &Path) -> io::Result<Vec<Entry>> {
    let bytes = match std::fs::read(data_dir.join(JOURNAL_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let (entries, valid) = decode_all(&bytes);
    if valid < bytes.len() {
        tracing::warn!(
            kept = entries.len(),
            cut_bytes = bytes.len() - valid,
            "the outbox journal ends with an incomplete write (a crash while recording, never answered 200): left out"
        );
    }
    Ok(entries)
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
/// Appends the frame of `record` as entry `seq` to `out`, in the layout [`Entry`] reads.
/// Encoded from borrowed fields: the body is copied once, into `out`.
pub(crate) fn encode(seq: u64, record: &Record, out: &mut Vec<u8>) {
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
            signed_at_ms: 0,
        }
    }

    #[test]
    fn entries_read_back_exactly_as_written() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read(dir.path()).unwrap().is_empty(),
            "no journal, no entries"
        );
        let bodies = ["{\"topic\":\"Zdeněk Ødegård\"}", "{}", "{\"n\":3}"];
        let mut frames = Vec::new();
        for (seq, body) in (7..).zip(bodies) {
            encode(seq, &record(body), &mut frames);
        }
        std::fs::write(dir.path().join(JOURNAL_FILE), &frames).unwrap();

        let read: Vec<(u64, Record)> = read(dir.path())
            .unwrap()
            .into_iter()
            .map(Entry::into_record)
            .collect();
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
    fn a_torn_end_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut frames = Vec::new();
        encode(1, &record("{\"a\":1}"), &mut frames);
        encode(2, &record("{\"a\":2}"), &mut frames);
        // A crash in the middle of the next write: half a frame at the end.
        let mut torn = Vec::new();
        encode(3, &record("{\"a\":3}"), &mut torn);
        frames.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(dir.path().join(JOURNAL_FILE), &frames).unwrap();
        let entries = read(dir.path()).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
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
}
