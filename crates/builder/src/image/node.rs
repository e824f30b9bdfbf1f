//! `docker:node`: the original's fixed Dockerfile on `base_image`: the plan in `/plan`,
//! `npm ci`, `npm start` as the entry point.

use std::collections::BTreeMap;

use super::{Built, CA_FILE, Step};
use crate::BuildError;
use crate::config::Config;

/// The original's Dockerfile, with the plan copied to `/plan` explicitly (the context root
/// holds only the Dockerfile and `plan/`). With `with_ca`, `npm ci` also trusts the host's CA
/// bundle (see `Step::trust`: behind a TLS-intercepting proxy the registry is unreachable
/// otherwise); the bundle is copied before the plan so that its layer stays cached, and removed
/// again after `npm ci`.
fn dockerfile(with_ca: bool) -> String {
    let (copy_ca, npm_ci) = if with_ca {
        (
            format!("COPY {CA_FILE} /tmp/{CA_FILE}\n"),
            format!("RUN NODE_EXTRA_CA_CERTS=/tmp/{CA_FILE} npm ci && rm -f /tmp/{CA_FILE}\n"),
        )
    } else {
        (String::new(), "RUN npm ci\n".to_owned())
    };
    format!(
        "ARG BASE_IMAGE\n\
         FROM ${{BASE_IMAGE}}\n\
         ENV PLAN_DIR /plan\n\
         WORKDIR /plan\n\
         {copy_ca}\
         COPY plan /plan\n\
         {npm_ci}\
         EXPOSE 6060\n\
         ENTRYPOINT [\"npm\", \"start\"]\n"
    )
}

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
        let ca = super::host_ca_bundle();
        let context = super::plan_context(step, Some(dockerfile(ca.is_some())), ca).await?;
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
        assert_eq!(
            dockerfile(false),
            "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nENV PLAN_DIR /plan\nWORKDIR /plan\n\
             COPY plan /plan\nRUN npm ci\nEXPOSE 6060\nENTRYPOINT [\"npm\", \"start\"]\n"
        );
        let with_ca = dockerfile(true);
        let copy_ca = with_ca.find("COPY tg-ca-certificates.crt").unwrap();
        assert!(copy_ca < with_ca.find("COPY plan /plan").unwrap());
        assert!(with_ca.contains(
            "RUN NODE_EXTRA_CA_CERTS=/tmp/tg-ca-certificates.crt npm ci && rm -f /tmp/tg-ca-certificates.crt\n"
        ));
    }
}
