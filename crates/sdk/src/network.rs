//! [`NetClient`] (wait for the network, reconfigure it, find the data IP). The `network.Config`
//! types an instance publishes to its sidecar live in `tg_api::network` and are re-exported here.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use tg_api::events::Event;
pub use tg_api::network::{
    DEFAULT_DATA_NETWORK, FilterAction, LinkRule, LinkShape, NetworkConfig, RoutingPolicy,
};

use crate::runenv::RunEnv;
use crate::sync::{SyncClient, SyncError};

/// A network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("no callback state provided")]
    NoCallbackState,
    #[error("no local address in the data network {subnet}")]
    NoDataAddress { subnet: String },
    #[error("TEST_SUBNET is not set")]
    NoSubnet,
    #[error("cannot list network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
}

/// Network operations of an instance, over its sync client.
#[derive(Clone, Debug)]
pub struct NetClient {
    sync: SyncClient,
    runenv: RunEnv,
}

impl NetClient {
    pub fn new(sync: SyncClient, runenv: RunEnv) -> NetClient {
        NetClient { sync, runenv }
    }

    /// Waits until the sidecar has set up every instance's network. Without a sidecar there is
    /// nothing to wait for, but the stage events are still published (as sdk-go does).
    pub async fn wait_network_initialized(&self) -> Result<(), NetError> {
        let stage = "network-initialized";
        let group = self.runenv.test_group_id.clone();
        let start = Event::StageStart {
            name: stage.into(),
            group: group.clone(),
        };
        self.sync.publish_event(&start).await?;
        if self.runenv.test_sidecar {
            let target = i64::try_from(self.runenv.test_instance_count).unwrap_or(i64::MAX);
            if let Err(e) = self.sync.barrier(stage, target).await {
                self.runenv.record_message("network initialisation failed");
                return Err(e.into());
            }
        }
        // The k8s runner watches for this exact text.
        self.runenv
            .record_message("network initialisation successful");
        let end = Event::StageEnd {
            name: stage.into(),
            group,
        };
        self.sync.publish_event(&end).await?;
        Ok(())
    }

    /// Asks the sidecar to apply `config` and waits until `callback_target` instances (default:
    /// all) have signalled `callback_state`. Without a sidecar this records a warning and
    /// succeeds, as sdk-go does.
    pub async fn configure_network(&self, config: &NetworkConfig) -> Result<(), NetError> {
        if !self.runenv.test_sidecar {
            self.runenv.record_message(
                "ignoring network change request; running in a sidecar-less environment",
            );
            return Ok(());
        }
        if config.callback_state.is_empty() {
            return Err(NetError::NoCallbackState);
        }
        let topic = format!("network:{}", hostname(&self.runenv.hostname));
        self.sync.publish(&topic, config).await?;
        let target = config
            .callback_target
            .filter(|t| *t > 0)
            .unwrap_or(self.runenv.test_instance_count);
        let target = i64::try_from(target).unwrap_or(i64::MAX);
        self.sync.barrier(&config.callback_state, target).await?;
        Ok(())
    }

    /// This instance's address on the data network: the first local address inside
    /// `TEST_SUBNET`, or 127.0.0.1 without a sidecar.
    pub fn data_network_ip(&self) -> Result<IpAddr, NetError> {
        if !self.runenv.test_sidecar {
            return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let subnet = self.runenv.test_subnet.ok_or(NetError::NoSubnet)?;
        data_ip_in(&subnet, &local_addresses()?).ok_or_else(|| NetError::NoDataAddress {
            subnet: subnet.to_string(),
        })
    }
}

/// The first of `addrs` inside `subnet`.
pub fn data_ip_in(subnet: &IpNet, addrs: &[IpAddr]) -> Option<IpAddr> {
    addrs.iter().copied().find(|a| subnet.contains(a))
}

/// Every address of every local interface, IPv4 first.
fn local_addresses() -> Result<Vec<IpAddr>, NetError> {
    let ifaddrs =
        nix::ifaddrs::getifaddrs().map_err(|e| NetError::Interfaces(std::io::Error::from(e)))?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ifa in ifaddrs {
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            v4.push(IpAddr::V4(sin.ip()));
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            v6.push(IpAddr::V6(sin6.ip()));
        }
    }
    v4.extend(v6);
    Ok(v4)
}

/// `HOSTNAME` when set, else the kernel hostname (what sdk-go's `os.Hostname()` returns).
pub(crate) fn hostname(from_env: &str) -> String {
    if !from_env.is_empty() {
        return from_env.to_owned();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_address_in_the_subnet() {
        let subnet: IpNet = "100.64.0.0/16".parse().unwrap();
        let addrs: Vec<IpAddr> = ["127.0.0.1", "198.18.0.5", "100.64.0.7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            data_ip_in(&subnet, &addrs),
            Some("100.64.0.7".parse().unwrap())
        );
        assert_eq!(data_ip_in(&"10.0.0.0/8".parse().unwrap(), &addrs), None);
        assert!(!local_addresses().unwrap().is_empty());
    }
}
