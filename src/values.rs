//! Conversions between JSON and `autokitteh.values.v1.Value`.

use prost::Message;

use crate::proto::autokitteh::events::v1::Event;
use crate::proto::autokitteh::values::v1 as pb;

/// The JSON form of a value, as AutoKitteh's `json_values` option shows it: a time is RFC 3339
/// text in UTC, a duration its seconds, an integer too large for 64 bits its digits as text.
/// Kinds with no JSON form (functions, modules, custom values) become `null`.
pub fn to_json(value: &pb::Value) -> serde_json::Value {
    use serde_json::Value as J;
    if let Some(v) = &value.string {
        J::String(v.v.clone())
    } else if let Some(v) = &value.integer {
        J::from(v.v)
    } else if let Some(v) = &value.big_integer {
        // serde_json keeps only i64 and u64 exactly (larger numbers become f64): past them the
        // digits go as text, never rounded.
        v.v.parse::<i64>()
            .map(J::from)
            .or_else(|_| v.v.parse::<u64>().map(J::from))
            .unwrap_or_else(|_| J::String(v.v.clone()))
    } else if let Some(v) = &value.float {
        serde_json::Number::from_f64(v.v).map_or(J::Null, J::Number)
    } else if let Some(v) = &value.boolean {
        J::Bool(v.v)
    } else if let Some(v) = &value.list {
        J::Array(v.vs.iter().map(to_json).collect())
    } else if let Some(v) = &value.set {
        J::Array(v.vs.iter().map(to_json).collect())
    } else if let Some(v) = &value.dict {
        J::Object(
            v.items
                .iter()
                .map(|item| {
                    let key = match item.k.as_ref().map(to_json) {
                        Some(J::String(s)) => s,
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    (key, item.v.as_ref().map_or(J::Null, to_json))
                })
                .collect(),
        )
    } else if let Some(v) = &value.r#struct {
        J::Object(
            v.fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        )
    } else if let Some(ts) = value.time.as_ref().and_then(|t| t.v.as_ref()) {
        // RFC 3339 in UTC, as Zoom takes `start_time` and `from`/`to` dates.
        let format = if ts.nanos == 0 {
            chrono::SecondsFormat::Secs
        } else {
            chrono::SecondsFormat::AutoSi
        };
        u32::try_from(ts.nanos)
            .ok()
            .and_then(|nanos| chrono::DateTime::from_timestamp(ts.seconds, nanos))
            .map_or(J::Null, |t| J::String(t.to_rfc3339_opts(format, true)))
    } else if let Some(d) = value.duration.as_ref().and_then(|d| d.v.as_ref()) {
        // Seconds, whole when they are.
        if d.nanos == 0 {
            J::from(d.seconds)
        } else {
            serde_json::Number::from_f64(d.seconds as f64 + f64::from(d.nanos) / 1e9)
                .map_or(J::Null, J::Number)
        }
    } else if let Some(v) = &value.symbol {
        J::String(v.name.clone())
    } else if let Some(v) = &value.bytes {
        J::String(hex::encode(&v.v))
    } else {
        J::Null
    }
}

/// A value holding text.
pub fn string(s: impl Into<String>) -> pb::Value {
    pb::Value {
        string: Some(pb::String { v: s.into() }),
        ..Default::default()
    }
}

/// The value of nothing (JSON's null).
pub fn nothing() -> pb::Value {
    pb::Value {
        nothing: Some(pb::Nothing {}),
        ..Default::default()
    }
}

/// A value holding an integer.
pub fn integer(v: i64) -> pb::Value {
    pb::Value {
        integer: Some(pb::Integer { v }),
        ..Default::default()
    }
}

/// A dict of text keys, in the given order.
pub fn dict(items: Vec<(String, pb::Value)>) -> pb::Value {
    pb::Value {
        dict: Some(pb::Dict {
            items: items
                .into_iter()
                .map(|(k, v)| pb::dict::Item {
                    k: Some(string(k)),
                    v: Some(v),
                })
                .collect(),
        }),
        ..Default::default()
    }
}

/// An event's protobuf bytes in time linear in its size; they decode to the same event as
/// prost's `encode_to_vec` (same fields and lengths; `data`'s entries come last).
///
/// prost writes each nested message's length before its bytes by measuring it, so a value
/// nested `d` messages deep is measured `d` times; a JSON object becomes three messages per
/// level (`Value`, `Dict`, `Dict.Item`), so a Zoom payload's fields were measured a dozen times
/// over. Here every value and field is measured once (lengths kept in pre-order), then written.
pub fn encode_event(event: &Event) -> Vec<u8> {
    // Everything but `data` is flat: prost writes it. Fields may come in any order, and a
    // map's entries anywhere, so `data` follows.
    let rest = Event {
        event_id: event.event_id.clone(),
        destination_id: event.destination_id.clone(),
        event_type: event.event_type.clone(),
        data: Default::default(),
        memo: event.memo.clone(),
        created_at: event.created_at,
        seq: event.seq,
    };
    let mut lens = Vec::new();
    let mut data_len = 0;
    for (key, value) in &event.data {
        data_len += field_len(DATA_FIELD, entry_len(key, value, &mut lens));
    }
    let mut buf = Vec::with_capacity(rest.encoded_len() + data_len);
    put(&rest, &mut buf);
    let mut lens = lens.into_iter();
    for (key, value) in &event.data {
        let len = lens.next().expect("measured");
        put_key(DATA_FIELD, &mut buf);
        put_varint(len as u64, &mut buf);
        if !key.is_empty() {
            put_key(1, &mut buf);
            put_varint(key.len() as u64, &mut buf);
            buf.extend_from_slice(key.as_bytes());
        }
        if *value != pb::Value::default() {
            put_key(2, &mut buf);
            put_value(value, &mut lens, &mut buf);
        }
    }
    buf
}

/// `Event.data`'s field number.
const DATA_FIELD: u32 = 4;

/// Bytes of a varint.
fn varint_len(v: u64) -> usize {
    // 7 bits a byte; 0 takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// The key of a length-delimited field.
fn put_key(field: u32, buf: &mut Vec<u8>) {
    put_varint(u64::from(field << 3 | 2), buf);
}

/// Bytes of a length-delimited field whose content is `len` bytes.
fn field_len(field: u32, len: usize) -> usize {
    varint_len(u64::from(field << 3 | 2)) + varint_len(len as u64) + len
}

/// Measures a `data` entry (prost leaves out an empty key and a default value); pushes the
/// entry's length, then its value's lengths.
fn entry_len(key: &str, value: &pb::Value, lens: &mut Vec<usize>) -> usize {
    let slot = lens.len();
    lens.push(0);
    let mut len = 0;
    if !key.is_empty() {
        len += field_len(1, key.len());
    }
    if *value != pb::Value::default() {
        len += field_len(2, value_len(value, lens));
    }
    lens[slot] = len;
    len
}

/// Measures a value, pushing its length and then those of the fields inside it, in the order
/// `put_value` writes them.
fn value_len(value: &pb::Value, lens: &mut Vec<usize>) -> usize {
    let slot = lens.len();
    lens.push(0);
    let mut len = 0;
    for_each_field(value, |field, part| {
        len += field_len(
            field,
            match part {
                Part::Flat(m) => {
                    let flat = m.flat_len();
                    lens.push(flat);
                    flat
                }
                Part::Values(vs) => {
                    let slot = lens.len();
                    lens.push(0);
                    let inner = vs.iter().map(|v| field_len(1, value_len(v, lens))).sum();
                    lens[slot] = inner;
                    inner
                }
                Part::Items(items) => {
                    let slot = lens.len();
                    lens.push(0);
                    let mut inner = 0;
                    for item in items {
                        let slot = lens.len();
                        lens.push(0);
                        let mut item_len = 0;
                        for (field, v) in [(1, &item.k), (2, &item.v)] {
                            if let Some(v) = v {
                                item_len += field_len(field, value_len(v, lens));
                            }
                        }
                        lens[slot] = item_len;
                        inner += field_len(1, item_len);
                    }
                    lens[slot] = inner;
                    inner
                }
            },
        );
    });
    lens[slot] = len;
    len
}

/// Writes a value's length and bytes, taking the lengths `value_len` measured.
fn put_value(value: &pb::Value, lens: &mut impl Iterator<Item = usize>, buf: &mut Vec<u8>) {
    put_varint(lens.next().expect("measured") as u64, buf);
    for_each_field(value, |field, part| {
        put_key(field, buf);
        match part {
            Part::Flat(m) => {
                put_varint(lens.next().expect("measured") as u64, buf);
                m.flat_encode(buf);
            }
            Part::Values(vs) => {
                put_varint(lens.next().expect("measured") as u64, buf);
                for v in vs {
                    put_key(1, buf);
                    put_value(v, lens, buf);
                }
            }
            Part::Items(items) => {
                put_varint(lens.next().expect("measured") as u64, buf);
                for item in items {
                    put_key(1, buf);
                    put_varint(lens.next().expect("measured") as u64, buf);
                    for (field, v) in [(1, &item.k), (2, &item.v)] {
                        if let Some(v) = v {
                            put_key(field, buf);
                            put_value(v, lens, buf);
                        }
                    }
                }
            }
        }
    });
}

/// One present field of a `Value`: lists, sets and dicts are walked here; the rest (flat, or
/// never deep in events) prost measures and writes.
enum Part<'a> {
    Flat(&'a dyn FlatMessage),
    Values(&'a [pb::Value]),
    Items(&'a [pb::dict::Item]),
}

/// What `Part::Flat` needs of a message (`Message` itself cannot be a trait object).
trait FlatMessage {
    fn flat_len(&self) -> usize;
    fn flat_encode(&self, buf: &mut Vec<u8>);
}

impl<M: Message> FlatMessage for M {
    fn flat_len(&self) -> usize {
        self.encoded_len()
    }
    fn flat_encode(&self, buf: &mut Vec<u8>) {
        put(self, buf);
    }
}

/// Appends a message's bytes (without its length).
fn put(message: &impl Message, buf: &mut Vec<u8>) {
    // Only a buffer without room fails, and a Vec grows.
    message.encode(buf).expect("a Vec grows as needed");
}

/// Takes `value` and everything inside it from `budget`: every value (list and set elements,
/// dict keys and values, struct and module fields, a custom value's own), every dict item and
/// field or member name (each a message of its own, even when empty), and a function's flags
/// and descriptor entries; false, with the budget spent, once there are more than it held.
/// Each takes up to several hundred bytes decoded, from as little as 2 bytes on the wire: what
/// a caller may store is bounded by their count, not their bytes.
pub fn take_values(value: &pb::Value, budget: &mut usize) -> bool {
    let mut take = |n: usize| match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => {
            *budget = 0;
            false
        }
    };
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        if !take(1) {
            return false;
        }
        if let Some(l) = &value.list {
            pending.extend(&l.vs);
        }
        if let Some(s) = &value.set {
            pending.extend(&s.vs);
        }
        if let Some(d) = &value.dict {
            if !take(d.items.len()) {
                return false;
            }
            for item in &d.items {
                pending.extend(item.k.iter().chain(item.v.iter()));
            }
        }
        if let Some(s) = &value.r#struct {
            if !take(s.fields.len()) {
                return false;
            }
            pending.extend(s.ctor.as_deref().into_iter().chain(s.fields.values()));
        }
        if let Some(m) = &value.module {
            if !take(m.members.len()) {
                return false;
            }
            pending.extend(m.members.values());
        }
        if let Some(f) = &value.function {
            let desc = f.desc.as_ref().map_or(0, |d| {
                d.input.len()
                    + d.output.len()
                    + d.examples.len()
                    + d.input
                        .iter()
                        .chain(&d.output)
                        .map(|field| field.examples.len())
                        .sum::<usize>()
            });
            if !take(f.flags.len() + desc) {
                return false;
            }
        }
        if let Some(c) = &value.custom {
            pending.extend(c.value.as_deref());
        }
    }
    true
}

/// Calls `f` with each present field of `value` in field-number order, as prost writes them.
fn for_each_field<'a>(value: &'a pb::Value, mut f: impl FnMut(u32, Part<'a>)) {
    macro_rules! flat {
        ($field:literal, $m:expr) => {
            if let Some(m) = &$m {
                f($field, Part::Flat(m));
            }
        };
    }
    flat!(1, value.nothing);
    flat!(2, value.boolean);
    flat!(3, value.string);
    flat!(4, value.integer);
    flat!(5, value.float);
    if let Some(l) = &value.list {
        f(6, Part::Values(&l.vs));
    }
    if let Some(s) = &value.set {
        f(7, Part::Values(&s.vs));
    }
    if let Some(d) = &value.dict {
        f(8, Part::Items(&d.items));
    }
    flat!(9, value.bytes);
    flat!(10, value.time);
    flat!(11, value.duration);
    flat!(12, value.r#struct);
    flat!(13, value.module);
    flat!(14, value.symbol);
    flat!(15, value.function);
    flat!(16, value.custom);
    flat!(17, value.big_integer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_counted_at_every_depth_against_the_budget() {
        let nested = pb::Value {
            list: Some(pb::List {
                vs: vec![
                    dict(vec![("a".into(), integer(1)), ("b".into(), nothing())]),
                    pb::Value {
                        r#struct: Some(Box::new(pb::Struct {
                            ctor: Some(Box::new(string("point"))),
                            fields: [("x".to_string(), integer(2))].into(),
                        })),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        };
        // The list; the dict, its two items, their two keys and two values; the struct, its
        // field's name, its ctor and the field's value: 12.
        let mut budget = 12;
        assert!(take_values(&nested, &mut budget));
        assert_eq!(budget, 0);
        let mut budget = 11;
        assert!(!take_values(&nested, &mut budget));
        // Items with neither key nor value count too: each is a message decoded.
        let empty_items = pb::Value {
            dict: Some(pb::Dict {
                items: vec![pb::dict::Item::default(); 10],
            }),
            ..Default::default()
        };
        let mut budget = 11;
        assert!(take_values(&empty_items, &mut budget));
        let mut budget = 10;
        assert!(!take_values(&empty_items, &mut budget));
    }

    #[test]
    fn nested_values_become_json() {
        let dict = pb::Value {
            dict: Some(pb::Dict {
                items: vec![pb::dict::Item {
                    k: Some(string("id")),
                    v: Some(pb::Value {
                        integer: Some(pb::Integer { v: 85_746_065_432 }),
                        ..Default::default()
                    }),
                }],
            }),
            ..Default::default()
        };
        assert_eq!(
            to_json(&dict),
            serde_json::json!({"id": 85_746_065_432_i64})
        );
        assert_eq!(to_json(&string("Grüße")), serde_json::json!("Grüße"));
        assert_eq!(to_json(&pb::Value::default()), serde_json::Value::Null);
    }

    /// Decodes `encode_event`'s bytes and checks they are the event, as long as prost's.
    fn round_trip(event: &Event) {
        let bytes = encode_event(event);
        assert_eq!(bytes.len(), event.encoded_len(), "as long as prost's");
        assert_eq!(&Event::decode(bytes.as_slice()).unwrap(), event);
    }

    #[test]
    fn every_zoom_sample_encodes_to_bytes_that_decode_to_the_same_event() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("integration-tests/fixtures/zoom-samples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let body = std::fs::read(entry.unwrap().path()).unwrap();
            let received = crate::webhook::normalize::Received {
                event_type: "sample".into(),
                memo: [("account_id".to_string(), "Ãccount".to_string())].into(),
                received_ms: 1_700_000_000_123,
                body,
            };
            let event = crate::webhook::normalize::event(&received, "con_1").unwrap();
            round_trip(&event);
            seen += 1;
        }
        assert!(seen >= 5, "{seen} samples");
    }

    #[test]
    fn every_kind_of_value_deeply_nested_encodes_as_prost_does() {
        use crate::proto::autokitteh::module::v1 as module;
        let flat = vec![
            pb::Value {
                nothing: Some(pb::Nothing {}),
                ..Default::default()
            },
            pb::Value {
                boolean: Some(pb::Boolean { v: true }),
                ..Default::default()
            },
            string("Zdeněk Ødegård 🎥"),
            string("x".repeat(20_000)),
            integer(-85_746_065_432),
            pb::Value {
                float: Some(pb::Float { v: 1.5e300 }),
                ..Default::default()
            },
            pb::Value {
                bytes: Some(pb::Bytes { v: vec![0, 255] }),
                ..Default::default()
            },
            pb::Value {
                time: Some(pb::Time {
                    v: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: 2,
                    }),
                }),
                ..Default::default()
            },
            pb::Value {
                duration: Some(pb::Duration {
                    v: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 4,
                    }),
                }),
                ..Default::default()
            },
            pb::Value {
                r#struct: Some(Box::new(pb::Struct {
                    ctor: Some(Box::new(string("ctor"))),
                    fields: [("f".to_string(), integer(1))].into(),
                })),
                ..Default::default()
            },
            pb::Value {
                module: Some(pb::Module {
                    name: "m".into(),
                    members: [("x".to_string(), string("y"))].into(),
                }),
                ..Default::default()
            },
            pb::Value {
                symbol: Some(pb::Symbol { name: "s".into() }),
                ..Default::default()
            },
            pb::Value {
                function: Some(pb::Function {
                    executor_id: "e".into(),
                    name: "f".into(),
                    desc: Some(module::Function::default()),
                    data: vec![1],
                    flags: vec!["a".into()],
                }),
                ..Default::default()
            },
            pb::Value {
                custom: Some(Box::new(pb::Custom {
                    executor_id: "e".into(),
                    data: vec![2],
                    value: Some(Box::new(integer(3))),
                })),
                ..Default::default()
            },
            pb::Value {
                big_integer: Some(pb::BigInteger {
                    v: "123456789012345678901234567890".into(),
                }),
                ..Default::default()
            },
            // Several fields at once, and an empty dict item.
            pb::Value {
                string: Some(pb::String { v: "both".into() }),
                dict: Some(pb::Dict {
                    items: vec![pb::dict::Item { k: None, v: None }],
                }),
                set: Some(pb::Set {
                    vs: vec![pb::Value::default()],
                }),
                ..Default::default()
            },
        ];
        // Every kind at every depth, lists inside dicts inside lists, lengths of one to three
        // bytes.
        let mut nested = dict(
            flat.iter()
                .enumerate()
                .map(|(i, v)| (format!("key {i} ✓"), v.clone()))
                .collect(),
        );
        for depth in 0..12 {
            let mut items = flat.clone();
            items.push(nested);
            nested = if depth % 2 == 0 {
                pb::Value {
                    list: Some(pb::List { vs: items }),
                    ..Default::default()
                }
            } else {
                dict(
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| (format!("k{i}"), v))
                        .collect(),
                )
            };
        }
        let mut data: std::collections::HashMap<String, pb::Value> = flat
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("f{i}"), v))
            .collect();
        data.insert("payload".into(), nested);
        // prost leaves out an empty key and a default value: so does this.
        data.insert(String::new(), integer(7));
        data.insert("default".into(), pb::Value::default());
        let event = Event {
            event_id: "evt_1".into(),
            destination_id: "con_1".into(),
            event_type: "meeting.started".into(),
            data,
            memo: [("account_id".to_string(), "a".to_string())].into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            seq: 300,
        };
        assert!(event.encoded_len() > 1 << 16, "{}", event.encoded_len());
        round_trip(&event);
        round_trip(&Event::default());
    }

    #[test]
    fn varints_are_measured_and_written_as_prost_does() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, 1 << 35, u64::MAX] {
            let mut ours = Vec::new();
            put_varint(v, &mut ours);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
            assert_eq!(varint_len(v), theirs.len(), "{v}");
        }
    }

    #[test]
    fn times_durations_and_big_integers_reach_json_without_loss() {
        let time = |seconds, nanos| pb::Value {
            time: Some(pb::Time {
                v: Some(prost_types::Timestamp { seconds, nanos }),
            }),
            ..Default::default()
        };
        assert_eq!(to_json(&time(1_735_722_000, 0)), "2025-01-01T09:00:00Z");
        assert_eq!(
            to_json(&time(1_735_722_000, 500_000_000)),
            "2025-01-01T09:00:00.500Z"
        );
        let duration = |seconds, nanos| pb::Value {
            duration: Some(pb::Duration {
                v: Some(prost_types::Duration { seconds, nanos }),
            }),
            ..Default::default()
        };
        assert_eq!(to_json(&duration(90, 0)), serde_json::json!(90));
        assert_eq!(to_json(&duration(1, 500_000_000)), serde_json::json!(1.5));
        let big = |digits: &str| pb::Value {
            big_integer: Some(pb::BigInteger { v: digits.into() }),
            ..Default::default()
        };
        assert_eq!(
            to_json(&big("123456789012345678901234567890")),
            "123456789012345678901234567890"
        );
        assert_eq!(
            to_json(&big("18446744073709551615")),
            serde_json::json!(u64::MAX)
        );
        assert_eq!(to_json(&big("-42")), serde_json::json!(-42));
    }
}
