//! `docker:node`: the original's fixed Dockerfile on `base_image`: the plan in `/plan`,
//! `npm ci`, `npm start` as the entry point.

use std::collections::BTreeMap;

use tg_docker::context::Context;

use super::{Built, Step, add_plan};
use crate::config::Config;
use crate::{BuildError, blocking};

/// The original's, with the plan copied to `/plan` explicitly (the context root holds only
/// the Dockerfile and `plan/`).
const DOCKERFILE: &str = "ARG BASE_IMAGE\n\
FROM ${BASE_IMAGE}\n\
ENV PLAN_DIR /plan\n\
WORKDIR /plan\n\
COPY plan /plan\n\
RUN npm ci\n\
EXPOSE 6060\n\
ENTRYPOINT [\"npm\", \"start\"]\n";

#[derive(Debug)]
pub(super) struct Recipe {
    pub(super) base_image: String,
}

impl Recipe {
    pub(super) fn parse(cfg: &Config<'_>) -> Result<Recipe, BuildError> {
        Ok(Recipe {
            base_image: cfg
                .string("base_image")?
                .unwrap_or_else(|| tg_docker::base::NODE.to_owned()),
        })
    }

    pub(super) async fn build(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        let plan_dir = step.input.plan_dir.clone();
        let scratch = step.scratch.path().to_owned();
        let context = blocking("package", &plan_dir.clone(), move || {
            let io = |e| BuildError::io("assemble the build context in", &scratch, e);
            let mut ctx = Context::on_disk(&scratch).map_err(io)?;
            ctx.file("Dockerfile", DOCKERFILE.as_bytes(), 0o644)
                .map_err(io)?;
            add_plan(&mut ctx, &plan_dir, "plan")?;
            ctx.finish().map_err(io)
        })
        .await?;
        let args = BTreeMap::from([("BASE_IMAGE".to_owned(), self.base_image.clone())]);
        let id = step
            .image(context, "Dockerfile", args, BTreeMap::new())
            .await?;
        Ok(Built {
            id,
            dependencies: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base_image_defaults_and_must_be_a_string() {
        let m = json!({"enabled": true}).as_object().cloned().unwrap();
        let r = Recipe::parse(&Config::new("docker:node", &m)).unwrap();
        assert_eq!(r.base_image, tg_docker::base::NODE);
        let m = json!({"base_image": 5}).as_object().cloned().unwrap();
        assert!(matches!(
            Recipe::parse(&Config::new("docker:node", &m)),
            Err(BuildError::BadConfig { key, .. }) if key == "base_image"
        ));
        assert!(DOCKERFILE.contains("RUN npm ci\n"));
        assert!(DOCKERFILE.ends_with("ENTRYPOINT [\"npm\", \"start\"]\n"));
    }
}
