//! Command-line values (`--build-cfg`, `--run-cfg`, `--test-param`, `--dep`) and the
//! `TEST_INSTANCE_PARAMS` encoding.

use std::collections::BTreeMap;

use serde_json::Value;
use tg_api::composition::Dependency;

use crate::error::PlanError;

/// Splits `k=v` on the first `=` (the value may contain more). `flag` names the flag in errors.
pub fn parse_kv(flag: &str, s: &str) -> Result<(String, String), PlanError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(PlanError::Flag {
            flag: flag.to_owned(),
            value: s.to_owned(),
            message: "expected key=value".to_owned(),
        }),
    }
}

/// Types a `--build-cfg` / `--run-cfg` value as the original does: integer, then float, then
/// boolean, then a quoted string (unquoted), else the raw string.
pub fn infer_typed(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = s.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return Value::Number(n);
    }
    // Go's strconv.ParseBool spellings ("1"/"0" were already taken as integers).
    match s {
        "t" | "T" | "true" | "TRUE" | "True" => return Value::Bool(true),
        "f" | "F" | "false" | "FALSE" | "False" => return Value::Bool(false),
        _ => {}
    }
    if let Some(unquoted) = unquote(s) {
        return Value::String(unquoted);
    }
    Value::String(s.to_owned())
}

/// Go's `strconv.Unquote` for the forms a shell user writes: `"..."` with escapes and
/// `` `...` `` raw strings.
fn unquote(s: &str) -> Option<String> {
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        return serde_json::from_str::<String>(s).ok();
    }
    if s.len() >= 2 && s.starts_with('`') && s.ends_with('`') {
        let inner = &s[1..s.len() - 1];
        return (!inner.contains('`')).then(|| inner.to_owned());
    }
    None
}

/// `TEST_INSTANCE_PARAMS` (and `TEST_CAPTURE_PROFILES`): `k1=v1|k2=v2`, in key order so the
/// environment is reproducible.
pub fn encode_params(p: &BTreeMap<String, String>) -> String {
    p.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("|")
}

/// Parses `--dep module=target@version` (exactly one `@`; target may be empty).
pub fn parse_dep(s: &str) -> Result<Dependency, PlanError> {
    let bad = |message: &str| PlanError::Flag {
        flag: "--dep".to_owned(),
        value: s.to_owned(),
        message: message.to_owned(),
    };
    let (module, rest) = s
        .split_once('=')
        .ok_or_else(|| bad("expected module=target@version"))?;
    let parts: Vec<&str> = rest.split('@').collect();
    let [target, version] = parts.as_slice() else {
        return Err(bad("expected module=target@version with exactly one '@'"));
    };
    if module.trim().is_empty() || version.trim().is_empty() {
        return Err(bad(
            "expected module=target@version with a module and a version",
        ));
    }
    Ok(Dependency {
        module: module.trim().to_owned(),
        target: target.trim().to_owned(),
        version: version.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kv_splits_on_first_equals() {
        assert_eq!(
            parse_kv("--tp", "a=b=c").unwrap(),
            ("a".to_owned(), "b=c".to_owned())
        );
        assert_eq!(
            parse_kv("--tp", "a=").unwrap(),
            ("a".to_owned(), String::new())
        );
        let e = parse_kv("--build-cfg", "novalue").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--build-cfg: expected key=value, found \"novalue\""
        );
        assert!(parse_kv("--tp", "=v").is_err());
    }

    #[test]
    fn infer_typed_follows_the_original_order() {
        let cases = [
            ("42", json!(42)),
            ("-7", json!(-7)),
            ("1.5", json!(1.5)),
            ("true", json!(true)),
            ("F", json!(false)),
            ("\"quoted \\\"x\\\"\"", json!("quoted \"x\"")),
            ("`raw`", json!("raw")),
            ("plain", json!("plain")),
            ("NaN", json!("NaN")),
            ("", json!("")),
        ];
        for (input, want) in cases {
            assert_eq!(infer_typed(input), want, "input {input:?}");
        }
    }

    #[test]
    fn params_encode_sorted_with_pipes() {
        let p = BTreeMap::from([
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(encode_params(&p), "a=1|b=2");
        assert_eq!(encode_params(&BTreeMap::new()), "");
    }

    #[test]
    fn dep_needs_exactly_one_at() {
        let d = parse_dep("github.com/a/b=github.com/fork/b@v1.2.0").unwrap();
        assert_eq!(
            d,
            Dependency {
                module: "github.com/a/b".into(),
                target: "github.com/fork/b".into(),
                version: "v1.2.0".into()
            }
        );
        let d = parse_dep("m=@v1").unwrap();
        assert_eq!((d.target.as_str(), d.version.as_str()), ("", "v1"));
        for bad in ["m=t", "m=t@v@w", "noequals@v", "=t@v", "m=t@"] {
            let e = parse_dep(bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("--dep: expected module=target@version"),
                "{e}"
            );
        }
    }
}
