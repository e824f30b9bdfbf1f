//! From sdk-go's `network.Config` (what an instance publishes) to the emulator's
//! [`NodeConfig`], with the checks that make a bad request a clear message instead of a
//! wedged run.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use tg_api::network::{DEFAULT_DATA_NETWORK, FilterAction, LinkShape, NetworkConfig};
use tg_netem::{Filter, NodeConfig, Rule, Shape};

use crate::addr::check_data_addr;

/// What applying one `network.Config` asks of the sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub node: NodeConfig,
    /// A new data address, when the config names one different from the current.
    pub new_addr: Option<Ipv4Addr>,
    pub allow_all: bool,
    /// Parts of the config that were ignored, for the run log.
    pub warnings: Vec<String>,
}

/// A config that cannot be applied at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported network {0:?}: only \"default\" exists")]
    UnsupportedNetwork(String),
    #[error("bad IPv4: {0}")]
    BadAddress(String),
}

fn filter(f: FilterAction) -> Filter {
    match f {
        FilterAction::Accept => Filter::Accept,
        FilterAction::Reject => Filter::Reject,
        FilterAction::Drop => Filter::Drop,
    }
}

/// sdk-go durations are nanoseconds; a shape longer than u64 nanoseconds (584 years) is capped.
fn shape(s: &LinkShape) -> Shape {
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Shape {
        latency: ns(s.latency),
        jitter: ns(s.jitter),
        bandwidth: s.bandwidth,
        loss: s.loss,
        corrupt: s.corrupt,
        corrupt_corr: s.corrupt_corr,
        reorder: s.reorder,
        reorder_corr: s.reorder_corr,
        duplicate: s.duplicate,
        duplicate_corr: s.duplicate_corr,
    }
}

/// Translates `cfg` for an instance currently at `current` in `subnet`.
///
/// Unlike the original (which shaped only the default link and turned rules into routes), every
/// rule gets its own full shape as well as its filter.
pub fn plan(cfg: &NetworkConfig, subnet: Ipv4Net, current: Ipv4Addr) -> Result<Plan, ConfigError> {
    if cfg.network != DEFAULT_DATA_NETWORK {
        return Err(ConfigError::UnsupportedNetwork(cfg.network.clone()));
    }
    let mut warnings = Vec::new();
    let new_addr = match cfg.ipv4 {
        Some(net) if net.addr() != current => {
            check_data_addr(subnet, net.addr()).map_err(ConfigError::BadAddress)?;
            Some(net.addr())
        }
        _ => None,
    };
    if cfg.ipv6.is_some() {
        warnings.push("IPv6 is not supported by local:netns; ignored".to_string());
    }
    let mut rules = Vec::with_capacity(cfg.rules.len());
    for r in &cfg.rules {
        match r.subnet {
            IpNet::V4(net) => rules.push(Rule {
                subnet: net.trunc(),
                filter: filter(r.shape.filter),
                shape: shape(&r.shape),
            }),
            IpNet::V6(net) => warnings.push(format!("rule for IPv6 subnet {net} ignored")),
        }
    }
    Ok(Plan {
        node: NodeConfig {
            enabled: cfg.enable,
            filter: filter(cfg.default.filter),
            default: shape(&cfg.default),
            rules,
        },
        new_addr,
        // As in the original, anything but "allow_all" (including "") means deny_all.
        allow_all: cfg.routing_policy == tg_api::network::RoutingPolicy::AllowAll,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tg_api::network::{LinkRule, RoutingPolicy};

    fn subnet() -> Ipv4Net {
        "100.64.0.0/16".parse().unwrap()
    }

    #[test]
    fn translates_the_seed_config() {
        let cfg = NetworkConfig {
            default: LinkShape {
                latency: Duration::from_millis(100),
                bandwidth: 1 << 20,
                ..Default::default()
            },
            callback_state: "network-configured".into(),
            routing_policy: RoutingPolicy::DenyAll,
            ..Default::default()
        };
        let p = plan(&cfg, subnet(), Ipv4Addr::new(100, 64, 0, 2)).unwrap();
        assert_eq!(p.node.default.latency, 100_000_000);
        assert_eq!(p.node.default.bandwidth, 1 << 20);
        assert!(p.node.enabled);
        assert!(!p.allow_all);
        assert_eq!(p.new_addr, None);
    }

    #[test]
    fn rules_keep_filter_and_shape() {
        let cfg = NetworkConfig {
            rules: vec![
                LinkRule {
                    shape: LinkShape {
                        latency: Duration::from_millis(10),
                        filter: FilterAction::Reject,
                        ..Default::default()
                    },
                    subnet: "100.64.0.3/32".parse().unwrap(),
                },
                LinkRule {
                    shape: LinkShape::default(),
                    subnet: "fd00::/8".parse().unwrap(),
                },
            ],
            routing_policy: RoutingPolicy::AllowAll,
            ..Default::default()
        };
        let p = plan(&cfg, subnet(), Ipv4Addr::new(100, 64, 0, 2)).unwrap();
        assert_eq!(p.node.rules.len(), 1);
        assert_eq!(p.node.rules[0].filter, Filter::Reject);
        assert_eq!(p.node.rules[0].shape.latency, 10_000_000);
        assert_eq!(p.warnings.len(), 1);
        assert!(p.allow_all);
    }

    #[test]
    fn address_changes_are_checked() {
        let at = |ip: &str| NetworkConfig {
            ipv4: Some(ip.parse().unwrap()),
            ..Default::default()
        };
        let cur = Ipv4Addr::new(100, 64, 0, 2);
        assert_eq!(
            plan(&at("100.64.1.1/16"), subnet(), cur).unwrap().new_addr,
            Some(Ipv4Addr::new(100, 64, 1, 1))
        );
        assert_eq!(
            plan(&at("100.64.0.2/16"), subnet(), cur).unwrap().new_addr,
            None
        );
        assert!(matches!(
            plan(&at("16.0.1.1/24"), subnet(), cur),
            Err(ConfigError::BadAddress(_))
        ));
        let other = NetworkConfig {
            network: "other".into(),
            ..Default::default()
        };
        assert!(matches!(
            plan(&other, subnet(), cur),
            Err(ConfigError::UnsupportedNetwork(_))
        ));
    }
}
