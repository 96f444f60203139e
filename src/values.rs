//! Conversions between JSON and `autokitteh.values.v1.Value`.

use crate::proto::autokitteh::values::v1 as pb;

/// The JSON form of a value, as AutoKitteh's `json_values` option shows it.
/// Kinds with no JSON form (functions, modules, custom values) become `null`.
pub fn to_json(value: &pb::Value) -> serde_json::Value {
    use serde_json::Value as J;
    if let Some(v) = &value.string {
        J::String(v.v.clone())
    } else if let Some(v) = &value.integer {
        J::from(v.v)
    } else if let Some(v) = &value.big_integer {
        v.v.parse::<serde_json::Number>()
            .map(J::Number)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
