//! Composition templating: the subset of the original's Go `text/template` pre-processing that
//! compositions use in practice, `{{ .Env.NAME }}`.
//!
//! Anything else between `{{` and `}}` is an error rather than being passed through: the
//! original would have interpreted it, so leaving it in place would silently change meaning.

use std::collections::HashMap;

use crate::error::{Location, PlanError};

pub(crate) fn render(
    text: &str,
    file: &str,
    env: &HashMap<String, String>,
) -> Result<String, PlanError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut consumed = 0;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let at = consumed + open;
        let err = |message: String| PlanError::Invalid {
            file: file.to_owned(),
            field: String::new(),
            location: Some(Location::of_offset(text, at)),
            message,
        };
        let after_open = &rest[open + 2..];
        let Some(close) = after_open.find("}}") else {
            return Err(err("unterminated template action: missing '}}'".to_owned()));
        };
        let action = after_open[..close].trim();
        let name = action
            .strip_prefix(".Env.")
            .filter(|n| is_identifier(n))
            .ok_or_else(|| {
                err(format!(
                    "unsupported template action '{{{{ {action} }}}}'; only {{{{ .Env.NAME }}}} is supported"
                ))
            })?;
        let value = env.get(name).ok_or_else(|| {
            err(format!(
                "environment variable '{name}' used in template is not set"
            ))
        })?;
        out.push_str(value);
        let advance = open + 2 + close + 2;
        consumed += advance;
        rest = &rest[advance..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([
            ("PLAN".to_owned(), "network".to_owned()),
            ("N".to_owned(), "4".to_owned()),
        ])
    }

    #[test]
    fn substitutes_env_with_and_without_spaces() {
        let out = render(
            "plan = \"{{ .Env.PLAN }}\"\nn = {{.Env.N}}\n",
            "c.toml",
            &env(),
        )
        .unwrap();
        assert_eq!(out, "plan = \"network\"\nn = 4\n");
    }

    #[test]
    fn text_without_actions_is_unchanged() {
        let text = "a = \"{ not a template }\"\n";
        assert_eq!(render(text, "c.toml", &env()).unwrap(), text);
    }

    #[test]
    fn unknown_variable_is_named_with_its_position() {
        let e = render("a = 1\nb = \"{{ .Env.MISSING }}\"\n", "c.toml", &env()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.toml: line 2, column 6: environment variable 'MISSING' used in template is not set"
        );
    }

    #[test]
    fn unsupported_and_unterminated_actions_are_errors() {
        let e = render("a = {{ pick .X \"k\" }}", "c.toml", &env()).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported template action '{{ pick .X \"k\" }}'"),
            "{e}"
        );
        let e = render("a = {{ .Env.N ", "c.toml", &env()).unwrap_err();
        assert!(
            e.to_string().contains("unterminated template action"),
            "{e}"
        );
    }
}
