//! A Zoom webhook body becomes an `autokitteh.events.v1.Event`: `event_type` is Zoom's `event`,
//! `data` holds every top-level field of the body as a `Value`, `memo` carries the account id and
//! Zoom's request ids.
//!
//! The conversion reads the raw JSON text itself rather than going through `serde_json::Value`,
//! so that nothing is lost: integers stay integers whatever their size (beyond 64 bits they
//! become `big_integer` with their exact digits), text stays exactly as sent, and object keys
//! keep the order Zoom sent them in.

use std::collections::HashMap;

use crate::proto::autokitteh::events::v1::Event;
use crate::proto::autokitteh::values::v1 as pb;

/// Nesting deeper than this is refused (the request is checked with this same parser, so a
/// body answered 200 never reaches it here). Each level of objects is three nested protobuf
/// messages, and prost decodes at most 100: deeper events could be stored but never read back.
const MAX_DEPTH: usize = 32;

/// More values and keys than this are refused: each becomes a protobuf value of several
/// hundred bytes in memory, so a few MiB of `[0,0,…]` would otherwise take gigabytes. Zoom's
/// webhooks and API pages hold a few thousand at most.
pub const MAX_VALUES: usize = 100_000;

/// Why a body cannot be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("body is not a JSON object: {0}")]
pub struct NormalizeError(String);

impl NormalizeError {
    /// What is wrong, and at which byte, without saying what the text was for.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// Everything recorded about one webhook besides its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Zoom's `event`.
    pub event_type: String,
    /// Memo entries: `account_id`, Zoom's tracking and request ids, the request timestamp.
    pub memo: HashMap<String, String>,
    /// When the service accepted it, in Unix milliseconds.
    pub received_ms: i64,
    /// The raw body, exactly as signed.
    pub body: Vec<u8>,
}

/// The event for `destination` built from a recorded webhook.
pub fn event(received: &Received, destination: &str) -> Result<Event, NormalizeError> {
    Ok(Event {
        event_id: String::new(),
        destination_id: destination.to_string(),
        event_type: received.event_type.clone(),
        data: top_level_fields(&received.body)?,
        memo: received.memo.clone(),
        created_at: Some(prost_types::Timestamp {
            seconds: received.received_ms.div_euclid(1000),
            nanos: (received.received_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        seq: 0,
    })
}

/// Every top-level field of a JSON object, as values. A key given twice keeps its last value.
pub fn top_level_fields(body: &[u8]) -> Result<HashMap<String, pb::Value>, NormalizeError> {
    let mut parser = Parser::new(body);
    parser.skip_ws();
    if parser.peek() != Some(b'{') {
        return Err(parser.error("expected an object"));
    }
    let mut fields = HashMap::new();
    parser.object(0, |k, v| {
        fields.insert(k, v);
    })?;
    parser.skip_ws();
    if parser.pos != body.len() {
        return Err(parser.error("trailing characters"));
    }
    Ok(fields)
}

/// The value of one JSON text, losslessly (Zoom API answers use it too).
pub fn value(text: &[u8]) -> Result<pb::Value, NormalizeError> {
    let mut parser = Parser::new(text);
    let v = parser.value(0)?;
    parser.skip_ws();
    if parser.pos != text.len() {
        return Err(parser.error("trailing characters"));
    }
    Ok(v)
}

/// An object's fields with each key once, where it first appeared, holding its last value (as
/// serde_json reads an object, and as the top level is read): a dict with a key twice is not a
/// valid value for AutoKitteh.
fn without_repeated_keys(mut fields: Vec<(String, pb::Value)>) -> Vec<(String, pb::Value)> {
    let repeated = if fields.len() <= 16 {
        (1..fields.len()).any(|i| fields[..i].iter().any(|(k, _)| *k == fields[i].0))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(fields.len());
        !fields.iter().all(|(k, _)| seen.insert(k.as_str()))
    };
    if !repeated {
        return fields;
    }
    let mut at: HashMap<String, usize> = HashMap::with_capacity(fields.len());
    let mut kept: Vec<(String, pb::Value)> = Vec::with_capacity(fields.len());
    for (k, v) in fields.drain(..) {
        match at.get(&k) {
            Some(&i) => kept[i].1 = v,
            None => {
                at.insert(k.clone(), kept.len());
                kept.push((k, v));
            }
        }
    }
    kept
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
    /// Values and keys read so far.
    values: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a [u8]) -> Self {
        Self {
            text,
            pos: 0,
            values: 0,
        }
    }

    /// Counts one value or key against [`MAX_VALUES`].
    fn count(&mut self) -> Result<(), NormalizeError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(self.error(&format!("more than {MAX_VALUES} values and keys")));
        }
        Ok(())
    }

    fn error(&self, what: &str) -> NormalizeError {
        NormalizeError(format!("{what} at byte {}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), NormalizeError> {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected {:?}", byte as char)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<pb::Value, NormalizeError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.count()?;
        self.skip_ws();
        let v = match self.peek() {
            Some(b'{') => {
                let mut fields = Vec::new();
                self.object(depth, |k, v| fields.push((k, v)))?;
                let items = without_repeated_keys(fields)
                    .into_iter()
                    .map(|(k, v)| pb::dict::Item {
                        k: Some(crate::values::string(k)),
                        v: Some(v),
                    })
                    .collect();
                pb::Value {
                    dict: Some(pb::Dict { items }),
                    ..Default::default()
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut vs = Vec::new();
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                } else {
                    loop {
                        vs.push(self.value(depth + 1)?);
                        self.skip_ws();
                        match self.peek() {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.error("expected , or ]")),
                        }
                    }
                }
                pb::Value {
                    list: Some(pb::List { vs }),
                    ..Default::default()
                }
            }
            Some(b'"') => crate::values::string(self.string()?),
            Some(b't') => self.literal(b"true", boolean(true))?,
            Some(b'f') => self.literal(b"false", boolean(false))?,
            Some(b'n') => self.literal(b"null", crate::values::nothing())?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            _ => return Err(self.error("expected a value")),
        };
        Ok(v)
    }

    /// Parses `{ "k": v, ... }`, handing each pair to `each` in order.
    fn object(
        &mut self,
        depth: usize,
        mut each: impl FnMut(String, pb::Value),
    ) -> Result<(), NormalizeError> {
        self.expect(b'{')?;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a key"));
            }
            let key = self.string()?;
            self.count()?;
            self.expect(b':')?;
            let v = self.value(depth + 1)?;
            each(key, v);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected , or }")),
            }
        }
    }

    /// A string literal; escapes are decoded by serde_json, plain text is copied as it is.
    fn string(&mut self) -> Result<String, NormalizeError> {
        let start = self.pos;
        self.pos += 1;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 2;
                }
                // RFC 8259: control characters inside strings must be escaped (serde_json,
                // which checks requests first, refuses them too; found by fuzzing).
                Some(0x00..=0x1f) => return Err(self.error("control character in string")),
                Some(_) => self.pos += 1,
            }
        }
        self.pos += 1;
        let raw = &self.text[start..self.pos];
        if escaped {
            serde_json::from_slice(raw).map_err(|_| self.error("malformed string"))
        } else {
            std::str::from_utf8(&raw[1..raw.len() - 1])
                .map(str::to_string)
                .map_err(|_| self.error("string is not UTF-8"))
        }
    }

    fn literal(&mut self, word: &[u8], v: pb::Value) -> Result<pb::Value, NormalizeError> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err(self.error("expected true, false or null"))
        }
    }

    fn number(&mut self) -> Result<pb::Value, NormalizeError> {
        let start = self.pos;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.text[start..self.pos])
            .map_err(|_| self.error("malformed number"))?;
        let is_integer = !text.contains(['.', 'e', 'E']);
        if is_integer {
            let digits = text.strip_prefix('-').unwrap_or(text);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || (digits.len() > 1 && digits.starts_with('0'))
            {
                return Err(self.error("malformed number"));
            }
            return Ok(match text.parse::<i64>() {
                Ok(v) => pb::Value {
                    integer: Some(pb::Integer { v }),
                    ..Default::default()
                },
                Err(_) => pb::Value {
                    big_integer: Some(pb::BigInteger {
                        v: text.to_string(),
                    }),
                    ..Default::default()
                },
            });
        }
        // serde_json checks the JSON grammar (Rust's own parser accepts more, e.g. "1.").
        let v: f64 = serde_json::from_str(text).map_err(|_| self.error("malformed number"))?;
        Ok(pb::Value {
            float: Some(pb::Float { v }),
            ..Default::default()
        })
    }
}

fn boolean(v: bool) -> pb::Value {
    pb::Value {
        boolean: Some(pb::Boolean { v }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::to_json;

    fn int(v: &pb::Value) -> Option<i64> {
        v.integer.as_ref().map(|i| i.v)
    }

    #[test]
    fn decimals_become_the_nearest_float() {
        // Known to be read one bit off by a parser that scales by powers of ten.
        for (text, nearest) in [
            ("122.416294033786585", 122.416_294_033_786_58_f64),
            ("0.9215686321258545", 0.921_568_632_125_854_5),
            ("10587.436593658975", 10_587.436_593_658_975),
        ] {
            let v = value(text.as_bytes()).unwrap();
            let got = v.float.as_ref().map(|f| f.v).unwrap();
            assert_eq!(got.to_bits(), nearest.to_bits(), "{text}: {got}");
            assert_eq!(got.to_bits(), text.parse::<f64>().unwrap().to_bits());
        }
    }

    #[test]
    fn every_body_accepted_decodes_back_from_the_protobuf_the_host_stores() {
        use prost::Message;
        // A JSON object costs three protobuf messages (Value, Dict, Item), a list two; prost
        // refuses to decode past 100.
        let mut deepest_accepted = 0;
        for depth in 1..=60usize {
            for (open, close) in [("{\"a\":", "}"), ("[", "]")] {
                let received = Received {
                    event_type: "x".into(),
                    memo: HashMap::new(),
                    received_ms: 1,
                    body: format!(
                        "{{\"event\":\"x\",\"payload\":{}1{}}}",
                        open.repeat(depth),
                        close.repeat(depth)
                    )
                    .into_bytes(),
                };
                if let Ok(event) = event(&received, "con_x") {
                    let bytes = crate::values::encode_event(&event);
                    assert!(Event::decode(bytes.as_slice()).is_ok(), "{open} x {depth}");
                    deepest_accepted = deepest_accepted.max(depth);
                }
            }
        }
        assert!((25..60).contains(&deepest_accepted), "{deepest_accepted}");
    }

    #[test]
    fn more_values_than_the_limit_are_refused() {
        let list = |n: usize| {
            let items = vec!["0"; n].join(",");
            format!(r#"{{"event":"x","payload":[{items}]}}"#)
        };
        // `event`, its value, `payload` and its list: four besides the list's items.
        assert!(top_level_fields(list(MAX_VALUES - 4).as_bytes()).is_ok());
        let refused = top_level_fields(list(MAX_VALUES - 3).as_bytes()).unwrap_err();
        assert!(refused.to_string().contains("values and keys"), "{refused}");
        assert!(value(list(MAX_VALUES).as_bytes()).is_err());
    }

    #[test]
    fn every_top_level_field_becomes_a_value() {
        let body = r#"{"event":"meeting.started","event_ts":1648038806658,
            "payload":{"account_id":"PX5y","object":{"id":"86431910364","type":1,
            "topic":"Zdeněk Ødegård's Zoom Meeting","duration":0}}}"#;
        let fields = top_level_fields(body.as_bytes()).unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(to_json(&fields["event"]), "meeting.started");
        assert_eq!(int(&fields["event_ts"]), Some(1_648_038_806_658));
        let payload: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(to_json(&fields["payload"]), payload["payload"]);
        let object = &fields["payload"].dict.as_ref().unwrap().items[1];
        let topic = object.v.as_ref().unwrap().dict.as_ref().unwrap().items[2].clone();
        assert_eq!(
            topic.k.unwrap().string.unwrap().v,
            "topic",
            "keys keep their order"
        );
        assert_eq!(
            topic.v.unwrap().string.unwrap().v,
            "Zdeněk Ødegård's Zoom Meeting"
        );
    }

    #[test]
    fn numbers_keep_their_kind_and_digits() {
        assert_eq!(int(&value(b"0").unwrap()), Some(0));
        assert_eq!(int(&value(b"-42").unwrap()), Some(-42));
        assert_eq!(int(&value(b"9223372036854775807").unwrap()), Some(i64::MAX));
        for big in [
            "9223372036854775808",
            "123456789012345678901234567890",
            "-99999999999999999999",
        ] {
            let v = value(big.as_bytes()).unwrap();
            assert_eq!(v.big_integer.unwrap().v, big);
        }
        // Beyond f64's range, where serde_json gives up: still exact digits.
        let huge = format!("-9{}666", "0".repeat(400));
        assert!(serde_json::from_str::<serde_json::Value>(&huge).is_err());
        assert_eq!(value(huge.as_bytes()).unwrap().big_integer.unwrap().v, huge);
        assert_eq!(value(b"1.5").unwrap().float.unwrap().v, 1.5);
        assert_eq!(value(b"-2e3").unwrap().float.unwrap().v, -2000.0);
        assert_eq!(value(b"1.0").unwrap().float.unwrap().v, 1.0);
        for bad in ["01", "-", "1.", "1e", "+1", "--1", "1-2"] {
            assert!(value(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_escapes_and_literals_are_decoded_exactly() {
        let v = value(
            r#"["a\"b\\c\n\u00e9\ud83d\ude00", "日本語", true, false, null, [], {}]"#.as_bytes(),
        )
        .unwrap();
        let vs = v.list.unwrap().vs;
        assert_eq!(vs[0].string.as_ref().unwrap().v, "a\"b\\c\né😀");
        assert_eq!(vs[1].string.as_ref().unwrap().v, "日本語");
        assert!(vs[2].boolean.as_ref().unwrap().v);
        assert!(!vs[3].boolean.as_ref().unwrap().v);
        assert!(vs[4].nothing.is_some());
        assert!(vs[5].list.as_ref().unwrap().vs.is_empty());
        assert!(vs[6].dict.as_ref().unwrap().items.is_empty());
    }

    #[test]
    fn object_keys_keep_their_order() {
        let v = value(br#"{"z":1,"a":2,"m":3}"#).unwrap();
        let keys: Vec<String> = v
            .dict
            .unwrap()
            .items
            .iter()
            .map(|i| i.k.as_ref().unwrap().string.as_ref().unwrap().v.clone())
            .collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn a_key_repeated_in_a_nested_object_keeps_its_first_place_and_last_value() {
        let pairs = |v: pb::Value| -> Vec<(String, i64)> {
            v.dict
                .unwrap()
                .items
                .iter()
                .map(|i| {
                    let k = i.k.as_ref().unwrap().string.as_ref().unwrap().v.clone();
                    (k, int(i.v.as_ref().unwrap()).unwrap())
                })
                .collect()
        };
        let v = value(br#"{"x":1,"y":2,"x":3}"#).unwrap();
        assert_eq!(pairs(v), [("x".into(), 3), ("y".into(), 2)]);
        // Past 16 fields the repeats are found by hashing.
        let many: Vec<String> = (0..20).map(|n| format!(r#""k{n}":{n}"#)).collect();
        let text = format!(r#"{{"outer":{{{},"k3":99,"k19":7}}}}"#, many.join(","));
        let fields = top_level_fields(text.as_bytes()).unwrap();
        let inner = pairs(fields["outer"].clone());
        assert_eq!(inner.len(), 20);
        assert_eq!(inner[3], ("k3".into(), 99));
        assert_eq!(inner[19], ("k19".into(), 7));
        assert_eq!(inner[4], ("k4".into(), 4));
    }

    #[test]
    fn raw_control_characters_in_strings_are_refused_as_serde_json_does() {
        for text in [&b"\"a\x00b\""[..], b"\"\r\"", b"{\"k\":\"\n\"}"] {
            assert!(serde_json::from_slice::<serde_json::Value>(text).is_err());
            assert!(value(text).is_err(), "{text:?}");
        }
        assert_eq!(int(&value(b"[1]").unwrap().list.unwrap().vs[0]), Some(1));
    }

    #[test]
    fn malformed_or_non_object_bodies_are_refused() {
        for bad in [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"a\":}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "{\"a\":tru}",
            "{\"a\":\"unterminated}",
            "{a:1}",
        ] {
            assert!(top_level_fields(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(top_level_fields(deep.as_bytes()).is_err());
    }

    #[test]
    fn an_event_carries_type_destination_memo_and_receive_time() {
        let received = Received {
            event_type: "app_deauthorized".into(),
            memo: HashMap::from([("account_id".into(), "acc".into())]),
            received_ms: 1_700_000_000_123,
            body: br#"{"event":"app_deauthorized","payload":{"account_id":"acc","event_ts":"1700000000000"}}"#.to_vec(),
        };
        let e = event(&received, "con_01jf3xabcdefghjkmnpqrstvwx").unwrap();
        assert_eq!(e.event_type, "app_deauthorized");
        assert_eq!(e.destination_id, "con_01jf3xabcdefghjkmnpqrstvwx");
        assert_eq!(e.memo["account_id"], "acc");
        assert_eq!(e.data.len(), 2);
        let ts = e.created_at.unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
    }
}
