use serde_json::{Map, Value};

use crate::BuildError;

/// Typed, validated reads of a builder's configuration map.
///
/// Values set with `--build-cfg` arrive as strings, so booleans also accept `"true"`/`"false"`.
/// An empty string counts as unset, which lets a group override a manifest default away.
pub(crate) struct Config<'a> {
    builder: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Config<'a> {
    pub(crate) fn new(builder: &'a str, map: &'a Map<String, Value>) -> Self {
        Self { builder, map }
    }

    pub(crate) fn bad(&self, key: &str, expected: impl Into<String>) -> BuildError {
        BuildError::BadConfig {
            builder: self.builder.to_owned(),
            key: key.to_owned(),
            expected: expected.into(),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, BuildError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    /// A table of strings (`dockerfile_extensions`, `build_args`), in its order. Numbers and
    /// booleans become their text, as `--build-cfg` would have passed them; anything else is an
    /// error naming `key.<entry>`.
    pub(crate) fn string_table(&self, key: &str) -> Result<Vec<(String, String)>, BuildError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    _ => Err(self.bad(&format!("{key}.{k}"), "a string")),
                })
                .collect(),
            Some(_) => Err(self.bad(key, "a table of strings")),
        }
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>, BuildError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(_) => Err(self.bad(key, "a boolean")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn strings_and_booleans_are_typed() {
        let m = map(json!({"s": "x", "e": "", "n": 3, "b": true, "bs": "FALSE", "bad": "maybe"}));
        let c = Config::new("exec:go", &m);
        assert_eq!(c.string("s").unwrap().as_deref(), Some("x"));
        assert_eq!(c.string("e").unwrap(), None);
        assert_eq!(c.string("missing").unwrap(), None);
        assert!(matches!(c.string("n"), Err(BuildError::BadConfig { key, .. }) if key == "n"));
        assert_eq!(c.boolean("b").unwrap(), Some(true));
        assert_eq!(c.boolean("bs").unwrap(), Some(false));
        assert!(matches!(c.boolean("bad"), Err(BuildError::BadConfig { key, .. }) if key == "bad"));
    }

    #[test]
    fn string_tables_keep_order_and_name_bad_entries() {
        let m = map(json!({"t": {"b": "x", "a": 2, "c": true}, "bad": {"x": [1]}, "s": "no"}));
        let c = Config::new("docker:generic", &m);
        assert_eq!(
            c.string_table("t").unwrap(),
            [
                ("b".into(), "x".into()),
                ("a".into(), "2".into()),
                ("c".into(), "true".into())
            ]
        );
        assert!(c.string_table("missing").unwrap().is_empty());
        assert!(
            matches!(c.string_table("bad"), Err(BuildError::BadConfig { key, .. }) if key == "bad.x")
        );
        assert!(
            matches!(c.string_table("s"), Err(BuildError::BadConfig { key, .. }) if key == "s")
        );
    }
}
