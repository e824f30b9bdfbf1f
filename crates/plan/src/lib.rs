//! Loading, validating and resolving test plan files.
//!
//! This crate owns the path from `manifest.toml` / `composition.toml` text (or `single` command
//! flags) to resolved, typed builds and runs: TOML decoding with errors that name the file, line,
//! column and field; `{{ .Env.NAME }}` templating of compositions; the original's validation
//! rules; and the precedence of configuration and test parameters. It does not own the types
//! themselves (`tg_api::manifest`, `tg_api::composition`), nor building or running anything.
//!
//! Modules:
//! - [`error`]: [`PlanError`] and [`Location`].
//! - `decode`: TOML to typed values (paths, spans, unknown keys, datetimes).
//! - `template`: `{{ .Env.NAME }}` rendering.
//! - `manifest`: [`load_manifest`], [`parse_manifest`].
//! - `composition`: [`load_composition`], [`parse_composition`], [`to_toml`],
//!   [`single_composition`].
//! - `validate`: [`validate_for_build`], [`validate_for_run`], [`undeclared_test_params`].
//! - `params`: test parameters checked against the test case's declarations
//!   ([`check_param_value`]).
//! - `resolve`: [`resolve_builds`], [`resolve_run`] and their results.
//! - `flags`: command-line value parsing ([`parse_kv`], [`infer_typed`], [`parse_dep`]) and
//!   [`encode_params`].

mod composition;
mod decode;
pub mod error;
mod flags;
mod manifest;
mod params;
mod resolve;
mod template;
mod validate;

pub use composition::{
    SingleSpec, load_composition, parse_composition, single_composition, to_toml,
};
pub use error::{Location, PlanError};
pub use flags::{encode_params, infer_typed, parse_dep, parse_kv};
pub use manifest::{load_manifest, parse_manifest};
pub use params::check_value as check_param_value;
pub use resolve::{ResolvedBuild, ResolvedRun, ResolvedRunGroup, resolve_builds, resolve_run};
pub use validate::{undeclared_test_params, validate_for_build, validate_for_run};

/// A free-form configuration table.
pub use tg_api::manifest::Map;
