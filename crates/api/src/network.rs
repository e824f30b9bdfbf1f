//! sdk-go's `network.Config` and its parts: what an instance publishes on `network:<hostname>`
//! for its sidecar to apply.
//!
//! The JSON is sdk-go's exactly (§4.2 of the sync protocol reference): latency and jitter as
//! integer nanoseconds, `filter` as 0/1/2, whole percentages as `0` rather than `0.0`, keys
//! `IPv4`/`IPv6`, empty `rules` as `null`, and `callback_target` never serialised.

use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only data network the sidecar knows.
pub const DEFAULT_DATA_NETWORK: &str = "default";

/// What the sidecar does with packets to a rule's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterAction {
    #[default]
    Accept,
    /// Refuse with an ICMP error.
    Reject,
    /// Silently drop.
    Drop,
}

impl Serialize for FilterAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(match self {
            FilterAction::Accept => 0,
            FilterAction::Reject => 1,
            FilterAction::Drop => 2,
        })
    }
}

impl<'de> Deserialize<'de> for FilterAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(FilterAction::Accept),
            1 => Ok(FilterAction::Reject),
            2 => Ok(FilterAction::Drop),
            n => Err(serde::de::Error::custom(format!(
                "invalid filter action {n}"
            ))),
        }
    }
}

/// Whether instances may reach addresses outside the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RoutingPolicy {
    /// `""`: what sdk-go sends when unset; the sidecar treats it as deny_all.
    #[default]
    #[serde(rename = "")]
    Unset,
    #[serde(rename = "allow_all")]
    AllowAll,
    #[serde(rename = "deny_all")]
    DenyAll,
}

/// How packets on a link are shaped. Percentages are 0-100.
///
/// Missing fields decode as zero, as Go's decoder leaves them (sdk-js sends partial shapes).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkShape {
    #[serde(with = "nanos")]
    pub latency: Duration,
    #[serde(with = "nanos")]
    pub jitter: Duration,
    /// Bits per second; 0 means unlimited.
    pub bandwidth: u64,
    pub filter: FilterAction,
    #[serde(serialize_with = "go_float")]
    pub loss: f32,
    #[serde(serialize_with = "go_float")]
    pub corrupt: f32,
    #[serde(serialize_with = "go_float")]
    pub corrupt_corr: f32,
    #[serde(serialize_with = "go_float")]
    pub reorder: f32,
    #[serde(serialize_with = "go_float")]
    pub reorder_corr: f32,
    #[serde(serialize_with = "go_float")]
    pub duplicate: f32,
    #[serde(serialize_with = "go_float")]
    pub duplicate_corr: f32,
}

/// A shape (and filter) for traffic to one subnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRule {
    #[serde(flatten)]
    pub shape: LinkShape,
    pub subnet: IpNet,
}

/// A network configuration request (sdk-go's `network.Config`).
///
/// Every field may be missing and then decodes as Go's zero value (`""`, `false`, a zero
/// shape, no rules), as the original's decoder does; the sidecar judges the result (a missing
/// `network` is then refused as unsupported, as by the original). [`Default`] is instead what
/// an SDK sends when asked for the default network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The data network to configure; only [`DEFAULT_DATA_NETWORK`] exists.
    #[serde(default)]
    pub network: String,
    #[serde(rename = "IPv4", default, deserialize_with = "empty_as_none")]
    pub ipv4: Option<Ipv4Net>,
    #[serde(rename = "IPv6", default, deserialize_with = "empty_as_none")]
    pub ipv6: Option<Ipv6Net>,
    #[serde(default)]
    pub enable: bool,
    #[serde(default)]
    pub default: LinkShape,
    #[serde(
        default,
        serialize_with = "empty_as_null",
        deserialize_with = "null_as_empty"
    )]
    pub rules: Vec<LinkRule>,
    /// The state the sidecar signals once the configuration is applied (none when empty;
    /// sdk-go refuses to send an empty one).
    #[serde(default)]
    pub callback_state: String,
    /// How many signals of `callback_state` to wait for; `None` means every instance.
    /// Never sent (the sidecar does not need it).
    #[serde(skip)]
    pub callback_target: Option<u64>,
    #[serde(default)]
    pub routing_policy: RoutingPolicy,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            network: DEFAULT_DATA_NETWORK.to_owned(),
            ipv4: None,
            ipv6: None,
            enable: true,
            default: LinkShape::default(),
            rules: Vec::new(),
            callback_state: String::new(),
            callback_target: None,
            routing_policy: RoutingPolicy::Unset,
        }
    }
}

mod nanos {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Go durations are signed; a negative one means no delay.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let n = i64::deserialize(d)?;
        Ok(Duration::from_nanos(n.max(0) as u64))
    }
}

/// Go prints a whole float32 as `0`, not `0.0`; others as the shortest f32 text (`1.5`).
fn go_float<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f32(*v)
    }
}

fn empty_as_null<S: Serializer>(v: &[LinkRule], s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        s.collect_seq(v)
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LinkRule>, D::Error> {
    Ok(Option::<Vec<LinkRule>>::deserialize(d)?.unwrap_or_default())
}

/// sdk-go's `ptypes.IPNet` writes an unset address as `""`.
fn empty_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_docs_example_is_byte_identical() {
        let cfg = NetworkConfig {
            default: LinkShape {
                latency: Duration::from_millis(100),
                bandwidth: 1 << 20,
                ..Default::default()
            },
            callback_state: "network-configured".into(),
            callback_target: Some(2),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&cfg).unwrap(),
            r#"{"network":"default","IPv4":null,"IPv6":null,"enable":true,"default":{"latency":100000000,"jitter":0,"bandwidth":1048576,"filter":0,"loss":0,"corrupt":0,"corrupt_corr":0,"reorder":0,"reorder_corr":0,"duplicate":0,"duplicate_corr":0},"rules":null,"callback_state":"network-configured","routing_policy":""}"#
        );
    }

    #[test]
    fn go_full_example_is_byte_identical() {
        let go = r#"{"network":"default","IPv4":"16.0.1.1/24","IPv6":null,"enable":true,"default":{"latency":50000000,"jitter":5000000,"bandwidth":10485760,"filter":0,"loss":1.5,"corrupt":0,"corrupt_corr":0,"reorder":0,"reorder_corr":0,"duplicate":0,"duplicate_corr":0},"rules":[{"latency":0,"jitter":0,"bandwidth":0,"filter":2,"loss":0,"corrupt":0,"corrupt_corr":0,"reorder":0,"reorder_corr":0,"duplicate":0,"duplicate_corr":0,"subnet":"16.0.0.0/16"}],"callback_state":"cfg2","routing_policy":"deny_all"}"#;
        let cfg = NetworkConfig {
            ipv4: Some("16.0.1.1/24".parse().unwrap()),
            default: LinkShape {
                latency: Duration::from_millis(50),
                jitter: Duration::from_millis(5),
                bandwidth: 10 << 20,
                loss: 1.5,
                ..Default::default()
            },
            rules: vec![LinkRule {
                shape: LinkShape {
                    filter: FilterAction::Drop,
                    ..Default::default()
                },
                subnet: "16.0.0.0/16".parse().unwrap(),
            }],
            callback_state: "cfg2".into(),
            routing_policy: RoutingPolicy::DenyAll,
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&cfg).unwrap(), go);
        let back: NetworkConfig = serde_json::from_str(go).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn reads_rust_sdk_and_empty_forms() {
        let j = r#"{"network":"default","IPv4":"","IPv6":null,"enable":false,"default":{"latency":-5,"jitter":0,"bandwidth":0,"filter":1,"loss":0.0,"corrupt":0.0,"corrupt_corr":0.0,"reorder":0.0,"reorder_corr":0.0,"duplicate":0.0,"duplicate_corr":0.0},"rules":null,"callback_state":"x","callback_target":3,"routing_policy":"allow_all"}"#;
        let cfg: NetworkConfig = serde_json::from_str(j).unwrap();
        assert_eq!(cfg.ipv4, None);
        assert_eq!(cfg.default.latency, Duration::ZERO);
        assert_eq!(cfg.default.filter, FilterAction::Reject);
        assert_eq!(cfg.callback_target, None);
        assert_eq!(cfg.routing_policy, RoutingPolicy::AllowAll);
        assert!(serde_json::from_str::<FilterAction>("3").is_err());
    }

    #[test]
    fn missing_fields_are_go_zero_values() {
        // What sdk-js sends: only the fields it was given.
        let j = r#"{"network":"default","enable":true,"default":{"latency":25000000},"callback_state":"cfg"}"#;
        let cfg: NetworkConfig = serde_json::from_str(j).unwrap();
        assert_eq!(
            cfg.default,
            LinkShape {
                latency: Duration::from_millis(25),
                ..Default::default()
            }
        );
        assert!(cfg.rules.is_empty());
        assert_eq!(cfg.routing_policy, RoutingPolicy::Unset);
        assert_eq!(cfg.ipv4, None);
        let rule: LinkRule = serde_json::from_str(r#"{"subnet":"10.0.0.0/8","loss":5}"#).unwrap();
        assert_eq!(rule.shape.loss, 5.0);
        assert_eq!(rule.shape.jitter, Duration::ZERO);
        // Go zero-fills the top level too: an empty object decodes, to zero values.
        let empty: NetworkConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.network, "");
        assert!(!empty.enable);
        assert_eq!(empty.callback_state, "");
        // A rule without its subnet means nothing: still refused.
        assert!(serde_json::from_str::<LinkRule>(r#"{"loss":5}"#).is_err());
    }
}
