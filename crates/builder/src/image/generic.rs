//! `docker:generic`: the plan's own Dockerfile (`<path>/Dockerfile`), built with the context
//! laid out as the original's: the plan under `plan/` at the context root, so the Dockerfile
//! copies it with `COPY plan/ ...` (or `COPY plan/${PLAN_PATH} ...`).

use std::collections::{BTreeMap, HashSet};

use super::{Built, DEFAULT_IMAGES, Step, plan_subdir};
use crate::config::Config;
use crate::{BuildError, BuildInput};

#[derive(Debug)]
pub(super) struct Recipe {
    /// The Dockerfile's path inside the context.
    dockerfile: String,
    build_args: BTreeMap<String, String>,
    /// The images the Dockerfile starts from, as far as they can be told before building.
    from: Vec<String>,
}

impl Recipe {
    pub(super) fn parse(cfg: &Config<'_>, input: &BuildInput) -> Result<Recipe, BuildError> {
        let path_value = cfg.string("path")?.unwrap_or_else(|| "./".to_owned());
        let path = plan_subdir(cfg, "path", &path_value)?;
        let rel = if path.is_empty() {
            "Dockerfile".to_owned()
        } else {
            format!("{path}/Dockerfile")
        };
        let text = std::fs::read_to_string(input.plan_dir.join(&rel)).map_err(|e| {
            cfg.bad(
                "path",
                format!("the plan directory holding the Dockerfile (cannot read {rel}: {e})"),
            )
        })?;
        let mut build_args: BTreeMap<String, String> =
            cfg.string_table("build_args")?.into_iter().collect();
        build_args
            .entry("PLAN_PATH".to_owned())
            .or_insert(path_value);
        let from = from_images(&text, &build_args);
        Ok(Recipe {
            dockerfile: format!("plan/{rel}"),
            build_args,
            from,
        })
    }

    /// Default base images the Dockerfile starts from: made offline when missing.
    pub(super) fn default_images(&self) -> Vec<String> {
        self.from
            .iter()
            .filter(|i| DEFAULT_IMAGES.contains(&i.as_str()))
            .cloned()
            .collect()
    }

    /// Other images it starts from: the engine pulls them if it lacks them.
    pub(super) fn other_images(&self) -> Vec<String> {
        self.from
            .iter()
            .filter(|i| !DEFAULT_IMAGES.contains(&i.as_str()))
            .cloned()
            .collect()
    }

    pub(super) async fn build(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        let context = super::plan_context(step, None, None).await?;
        let id = step
            .image(
                context,
                &self.dockerfile,
                self.build_args.clone(),
                BTreeMap::new(),
            )
            .await?;
        Ok(Built {
            id,
            dependencies: BTreeMap::new(),
        })
    }
}

/// Dockerfile lines with continuations joined and comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let t = raw.trim();
        if t.starts_with('#') && current.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(t);
            if !current.trim().is_empty() {
                lines.push(std::mem::take(&mut current));
            }
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        lines.push(current);
    }
    lines
}

/// `$NAME`, `${NAME}` and `${NAME:-default}` from `vars`; unknown names expand to nothing,
/// as the builder does.
fn substitute(word: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(body) = rest.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                out.push('$');
                continue;
            };
            let expr = &body[..end];
            rest = &body[end + 1..];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            match vars.get(name).filter(|v| !v.is_empty()) {
                Some(v) => out.push_str(v),
                None => out.push_str(default.unwrap_or("")),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if let Some(v) = vars.get(&rest[..end]) {
                out.push_str(v);
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The external images a Dockerfile's `FROM` lines name (stages and `scratch` left out),
/// with build arguments and the `ARG` defaults before the first `FROM` substituted.
fn from_images(dockerfile: &str, build_args: &BTreeMap<String, String>) -> Vec<String> {
    let mut vars = build_args.clone();
    let mut stages: HashSet<String> = HashSet::new();
    let mut images = Vec::new();
    let mut seen_from = false;
    for line in logical_lines(dockerfile) {
        let mut words = line.split_whitespace();
        let Some(instruction) = words.next() else {
            continue;
        };
        if instruction.eq_ignore_ascii_case("ARG") && !seen_from {
            for w in words {
                if let Some((k, v)) = w.split_once('=') {
                    vars.entry(k.to_owned())
                        .or_insert_with(|| v.trim_matches('"').to_owned());
                }
            }
        } else if instruction.eq_ignore_ascii_case("FROM") {
            seen_from = true;
            let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
            let Some(image) = rest.first() else { continue };
            let image = substitute(image, &vars);
            let known = image.is_empty()
                || image.eq_ignore_ascii_case("scratch")
                || stages.contains(&image.to_ascii_lowercase());
            if !known && !images.contains(&image) {
                images.push(image);
            }
            if rest.len() >= 3 && rest[1].eq_ignore_ascii_case("AS") {
                stages.insert(rest[2].to_ascii_lowercase());
            }
        }
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn from_lines_name_the_base_images() {
        let df = "# syntax comment\n\
                  ARG IMG=golang:1.26-bookworm\n\
                  ARG RT\n\
                  FROM --platform=linux/amd64 ${IMG} AS build\n\
                  RUN echo \\\n  FROM not-an-image\n\
                  FROM build AS again\n\
                  FROM ${RT:-busybox:1.35.0-glibc}\n\
                  FROM scratch\n\
                  from $OTHER\n";
        let args = BTreeMap::from([("OTHER".to_owned(), "example/x:1".to_owned())]);
        assert_eq!(
            from_images(df, &args),
            [
                "golang:1.26-bookworm",
                "busybox:1.35.0-glibc",
                "example/x:1"
            ]
        );
        let args = BTreeMap::from([("IMG".to_owned(), "mine:2".to_owned())]);
        assert_eq!(from_images(df, &args)[0], "mine:2");
    }

    #[test]
    fn config_is_checked_and_plan_path_defaulted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("gen")).unwrap();
        std::fs::write(
            dir.path().join("gen/Dockerfile"),
            "FROM busybox:1.35.0-glibc\nFROM example/other\n",
        )
        .unwrap();
        let input = |config: serde_json::Value| BuildInput {
            build_id: "b".into(),
            plan: "p".into(),
            plan_dir: dir.path().to_owned(),
            builder: "docker:generic".into(),
            config: config.as_object().cloned().unwrap(),
            selectors: vec![],
            dependencies: vec![],
            work_dir: dir.path().join("work"),
        };
        let parse = |config| {
            let i = input(config);
            Recipe::parse(&Config::new("docker:generic", &i.config), &i)
        };
        let r = parse(json!({"path": "gen/", "build_args": {"X": "1"}})).unwrap();
        assert_eq!(r.dockerfile, "plan/gen/Dockerfile");
        assert_eq!(r.build_args["PLAN_PATH"], "gen/");
        assert_eq!(r.build_args["X"], "1");
        assert_eq!(r.default_images(), ["busybox:1.35.0-glibc"]);
        assert_eq!(r.other_images(), ["example/other"]);
        let r = parse(json!({"path": "gen", "build_args": {"PLAN_PATH": "mine"}})).unwrap();
        assert_eq!(r.build_args["PLAN_PATH"], "mine");
        for (config, key) in [
            (json!({}), "path"),
            (json!({"path": "../x"}), "path"),
            (json!({"path": "gen", "build_args": "x=1"}), "build_args"),
            (
                json!({"path": "gen", "build_args": {"A": {}}}),
                "build_args.A",
            ),
        ] {
            assert!(
                matches!(parse(config.clone()), Err(BuildError::BadConfig { key: k, .. }) if k == key),
                "{config}"
            );
        }
    }
}
