//! What the caller configures: per-node egress shaping and filtering.

use crate::Nanos;

/// Egress shaping of one link. Percentages are 0..=100 (netem's units); values outside are clamped.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Shape {
    pub latency: Nanos,
    pub jitter: Nanos,
    /// Bits per second; 0 = unlimited.
    pub bandwidth: u64,
    pub loss: f32,
    pub corrupt: f32,
    pub corrupt_corr: f32,
    pub reorder: f32,
    pub reorder_corr: f32,
    pub duplicate: f32,
    pub duplicate_corr: f32,
}

/// What a link does with the packets it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Filter {
    #[default]
    Accept,
    /// Drop and tell the sender (ICMP administratively prohibited), so connection attempts fail at once.
    Reject,
    /// Drop silently, so connection attempts time out.
    Drop,
}

/// Shaping and filtering for traffic to one destination subnet.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub subnet: ipnet::Ipv4Net,
    pub filter: Filter,
    pub shape: Shape,
}

/// A node's egress configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    /// false = the node is disconnected from the data network: nothing it sends or is sent to it passes.
    pub enabled: bool,
    /// Filter for traffic matching no rule (Accept normally).
    pub filter: Filter,
    pub default: Shape,
    pub rules: Vec<Rule>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            filter: Filter::Accept,
            default: Shape::default(),
            rules: Vec::new(),
        }
    }
}
