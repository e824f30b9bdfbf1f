//! placeholder
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
pub struct Manifest {}
