//! TOML text to typed values, with errors that name the line, column and TOML path, and with
//! unknown keys reported (compositions) or ignored (manifests).

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Location, PlanError, Seg, format_path};

/// The key under which the `toml` crate smuggles datetimes through serde.
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnknownKeys {
    Reject,
    Ignore,
}

/// Decodes `text` into `T`. `file` names the file in errors.
pub(crate) fn decode<T: DeserializeOwned>(
    text: &str,
    file: &str,
    unknown: UnknownKeys,
) -> Result<T, PlanError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, file, &e, ""))?;
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
    let mut ignored: Vec<Vec<Seg>> = Vec::new();
    let result: Result<T, toml::de::Error> =
        serde_ignored::deserialize(tracked, |path| ignored.push(ignored_segs(&path)));
    match result {
        Ok(value) => {
            if unknown == UnknownKeys::Reject
                && let Some(first) = ignored.first()
            {
                return Err(PlanError::invalid(
                    file,
                    format_path(first),
                    "unknown field",
                ));
            }
            Ok(value)
        }
        Err(e) => {
            let field = format_path(&tracked_segs(&track.path()));
            Err(toml_error(text, file, &e, &field))
        }
    }
}

fn toml_error(text: &str, file: &str, e: &toml::de::Error, field: &str) -> PlanError {
    PlanError::Invalid {
        file: file.to_owned(),
        field: field.to_owned(),
        location: e.span().map(|s| Location::of_offset(text, s.start)),
        message: friendly(e.message().trim()),
    }
}

/// serde names Rust types in its messages; users write TOML.
fn friendly(message: &str) -> String {
    let first_line = message.lines().next().unwrap_or_default();
    first_line
        .replace("expected u32", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
        .replace("expected a borrowed string", "expected a string")
}

fn tracked_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

fn ignored_segs(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    let mut segs = Vec::new();
    let mut cur = path;
    loop {
        match cur {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                segs.push(Seg::Index(*index));
                cur = parent;
            }
            serde_ignored::Path::Map { parent, key } => {
                segs.push(Seg::Key(key.clone()));
                cur = parent;
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => cur = parent,
        }
    }
    segs.reverse();
    segs
}

/// Replaces the `toml` crate's datetime wrapper objects by their string form, so config maps
/// and parameter defaults hold plain JSON.
pub(crate) fn datetimes_to_strings(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.len() == 1
                && let Some(Value::String(s)) = map.get(TOML_DATETIME_KEY)
            {
                *v = Value::String(s.clone());
                return;
            }
            map.values_mut().for_each(datetimes_to_strings);
        }
        Value::Array(items) => items.iter_mut().for_each(datetimes_to_strings),
        _ => {}
    }
}

pub(crate) fn map_datetimes_to_strings(map: &mut serde_json::Map<String, Value>) {
    map.values_mut().for_each(datetimes_to_strings);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Outer {
        items: Vec<Inner>,
        cfg: serde_json::Map<String, Value>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Inner {
        n: u32,
        tags: BTreeMap<String, String>,
    }

    fn err(text: &str, unknown: UnknownKeys) -> String {
        decode::<Outer>(text, "f.toml", unknown)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn wrong_type_names_line_column_and_path() {
        let msg = err(
            "[[items]]\nn = 1\n[[items]]\nn = \"two\"\n",
            UnknownKeys::Reject,
        );
        assert_eq!(
            msg,
            "f.toml: line 4, column 5: items[1].n: invalid type: string \"two\", expected a non-negative integer"
        );
        let msg = err("[[items]]\ntags = { a = 1 }\n", UnknownKeys::Reject);
        assert!(
            msg.starts_with("f.toml: line 2, column 14: items[0].tags.a: invalid type: integer"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let msg = err("[[items]]\nn = = 3\n", UnknownKeys::Reject);
        assert!(msg.starts_with("f.toml: line 2, column 5: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn unknown_keys_are_rejected_or_ignored() {
        let text = "[[items]]\nn = 1\n[[items]]\nbogus = 2\n";
        assert_eq!(
            err(text, UnknownKeys::Reject),
            "f.toml: items[1].bogus: unknown field"
        );
        let ok: Outer = decode(text, "f.toml", UnknownKeys::Ignore).unwrap();
        assert_eq!(ok.items.len(), 2);
    }

    #[test]
    fn datetimes_become_strings() {
        let mut o: Outer = decode(
            "[cfg]\nwhen = 1979-05-27T07:32:00Z\nnested = { d = 1979-05-27 }\n",
            "f.toml",
            UnknownKeys::Reject,
        )
        .unwrap();
        map_datetimes_to_strings(&mut o.cfg);
        assert_eq!(o.cfg["when"], Value::String("1979-05-27T07:32:00Z".into()));
        assert_eq!(o.cfg["nested"]["d"], Value::String("1979-05-27".into()));
    }
}
