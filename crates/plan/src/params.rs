//! Test parameter checks: every test parameter a composition (or `--test-param`) sets must be
//! declared by the test case, and its value must parse as the declared type.
//!
//! The original passes parameters through unchecked, so a plan reading `--tp answer=forty-two`
//! as an int panics mid-run. We refuse such a value before anything is built, and stay as
//! lenient as the SDKs' parsers: an undeclared or unknown type (and `string`) accepts anything,
//! numbers follow Go's `strconv`, durations Go's `time.ParseDuration`, sizes humanize's byte
//! sizes, `json` any JSON value and `[]T` a JSON array.

use tg_api::manifest::{Param, TestCase};

/// The parser a declared `type` names, lower-cased; `None` when values are not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Uint,
    Float,
    Bool,
    Duration,
    Size,
    Json,
    Array,
}

fn kind_of(declared: &str) -> Option<Kind> {
    let t = declared.trim().to_ascii_lowercase();
    Some(match t.as_str() {
        "int" | "integer" | "int8" | "int16" | "int32" | "int64" => Kind::Int,
        "uint" | "uint8" | "uint16" | "uint32" | "uint64" => Kind::Uint,
        "float" | "float32" | "float64" | "number" | "double" => Kind::Float,
        "bool" | "boolean" => Kind::Bool,
        "duration" => Kind::Duration,
        "size" | "bytes" => Kind::Size,
        "json" | "object" | "map" => Kind::Json,
        "array" | "list" => Kind::Array,
        _ if t.starts_with("[]") => Kind::Array,
        _ => return None,
    })
}

/// Checks `value` against `param`'s declared type. The error is a phrase such as
/// `expected an integer (type "int")`, for the caller to place after the parameter's name.
pub fn check_value(param: &Param, value: &str) -> Result<(), String> {
    let Some(kind) = kind_of(&param.kind) else {
        return Ok(());
    };
    let (ok, expected) = match kind {
        Kind::Int => (value.parse::<i64>().is_ok(), "an integer"),
        Kind::Uint => (
            value
                .strip_prefix('+')
                .unwrap_or(value)
                .parse::<u64>()
                .is_ok(),
            "a non-negative integer",
        ),
        Kind::Float => (value.parse::<f64>().is_ok(), "a number"),
        Kind::Bool => (
            matches!(
                value.to_ascii_lowercase().as_str(),
                "true" | "false" | "t" | "f" | "1" | "0"
            ),
            "true or false",
        ),
        Kind::Duration => (
            is_go_duration(value),
            "a duration such as 300ms, 1.5s or 2h45m",
        ),
        Kind::Size => (is_byte_size(value), "a size such as 512, 64KiB or 1.5GB"),
        Kind::Json => (
            serde_json::from_str::<serde_json::Value>(value).is_ok(),
            "a JSON value",
        ),
        Kind::Array => (
            matches!(
                serde_json::from_str::<serde_json::Value>(value),
                Ok(serde_json::Value::Array(_))
            ),
            "a JSON array such as [\"a\",\"b\"]",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {expected} (type {:?})", param.kind))
    }
}

/// Go's `time.ParseDuration`: an optional sign, then `0` or one or more decimal numbers each
/// followed by a unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`).
fn is_go_duration(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    if s == "0" {
        return true;
    }
    if s.is_empty() {
        return false;
    }
    let mut rest = s;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..digits_end];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return false;
        }
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        if !matches!(
            &rest[..unit_end],
            "ns" | "us" | "µs" | "μs" | "ms" | "s" | "m" | "h"
        ) {
            return false;
        }
        rest = &rest[unit_end..];
    }
    true
}

/// humanize's `ParseBytes`: a decimal number, optional spaces, and an optional unit such as
/// `B`, `k`, `KB`, `KiB`, up to exabytes, case-insensitive.
fn is_byte_size(s: &str) -> bool {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    if number.parse::<f64>().is_err() {
        return false;
    }
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    matches!(unit, "" | "k" | "m" | "g" | "t" | "p" | "e")
}

/// Why `name = value` is not acceptable for test case `tc`, or `None` when it is.
pub(crate) fn problem(tc: &TestCase, name: &str, value: &str) -> Option<String> {
    match tc.params.get(name) {
        None => Some(unknown(tc, name)),
        Some(p) => check_value(p, value)
            .err()
            .map(|why| format!("test parameter {name:?}: {why}, found {value:?}")),
    }
}

fn unknown(tc: &TestCase, name: &str) -> String {
    if tc.params.is_empty() {
        format!(
            "unknown test parameter {name:?}: test case {} declares no parameters",
            tc.name
        )
    } else {
        let names: Vec<&str> = tc.params.keys().map(String::as_str).collect();
        format!(
            "unknown test parameter {name:?}: test case {} has parameters [{}]",
            tc.name,
            names.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(kind: &str) -> Param {
        Param {
            kind: kind.into(),
            ..Param::default()
        }
    }

    #[test]
    fn each_type_accepts_what_its_sdk_parser_accepts() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "int",
                &["42", "-7", "+3", "0"],
                &["forty-two", "4.2", "", " 1"],
            ),
            ("uint", &["0", "9"], &["-1", "x"]),
            ("float", &["1.5", "-2", "1e3", "inf"], &["one", ""]),
            (
                "bool",
                &["true", "FALSE", "t", "0", "True"],
                &["yes", "ture", ""],
            ),
            (
                "duration",
                &["300ms", "1.5s", "2h45m", "-1m", "0", "10us", "5µs"],
                &["5", "1d", "ms", "1.2.3s", "", "s1"],
            ),
            (
                "size",
                &["512", "64KiB", "1.5 GB", "10k", "3mb"],
                &["big", "1 xb", ""],
            ),
            ("json", &["{\"a\":1}", "[1]", "3", "\"s\""], &["{a:1}", ""]),
            ("[]string", &["[\"a\",\"b\"]", "[]"], &["a,b", "{}"]),
        ];
        for (kind, good, bad) in cases {
            let p = param(kind);
            for v in *good {
                assert!(check_value(&p, v).is_ok(), "{kind}: {v:?} should pass");
            }
            for v in *bad {
                let e = check_value(&p, v).unwrap_err();
                assert!(e.contains(&format!("(type {kind:?})")), "{e}");
            }
        }
    }

    #[test]
    fn strings_and_unknown_types_accept_anything() {
        for kind in ["string", "", "enum", "custom"] {
            assert!(check_value(&param(kind), "forty-two").is_ok(), "{kind}");
        }
        // Types are matched case-insensitively, as users write them.
        assert!(check_value(&param("Int"), "x").is_err());
    }

    #[test]
    fn problems_name_the_parameter_and_the_choices() {
        let mut tc = TestCase {
            name: "params".into(),
            ..TestCase::default()
        };
        assert_eq!(
            problem(&tc, "answer", "1").unwrap(),
            "unknown test parameter \"answer\": test case params declares no parameters"
        );
        tc.params.insert("answer".into(), param("int"));
        tc.params.insert("word".into(), param("string"));
        assert_eq!(
            problem(&tc, "anser", "1").unwrap(),
            "unknown test parameter \"anser\": test case params has parameters [answer word]"
        );
        assert_eq!(
            problem(&tc, "answer", "forty-two").unwrap(),
            "test parameter \"answer\": expected an integer (type \"int\"), found \"forty-two\""
        );
        assert_eq!(problem(&tc, "answer", "42"), None);
        assert_eq!(problem(&tc, "word", "anything"), None);
    }
}
