//! Which addresses webhooks may call. An integrator chooses the URL, so without a policy Keel would
//! POST wherever it is told from inside the network (server-side request forgery): the cloud
//! metadata service at 169.254.169.254, a database on 10.0.0.5, an admin port on 127.0.0.1.
//! Every address a name resolves to is checked at delivery time (a name can change its answer), and
//! redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub allow_loopback: bool,
    /// Private and link-local ranges.
    pub allow_private: bool,
}

/// Why an address may not be called, naming the setting that would allow it.
pub fn refusal(policy: NetworkPolicy, ip: IpAddr) -> Option<String> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let never = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if never {
        return Some(format!("{ip} is not a unicast address"));
    }
    if is_loopback(ip) && !policy.allow_loopback {
        return Some(format!("{ip} is a loopback address; set KEEL_WEBHOOK_ALLOW_LOOPBACK=true to allow it"));
    }
    if is_private(ip) && !policy.allow_private {
        return Some(format!(
            "{ip} is a private or link-local address; set KEEL_WEBHOOK_ALLOW_PRIVATE=true to allow it"
        ));
    }
    None
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local() || is_shared_v4(v4),
        IpAddr::V6(v6) => is_unique_local_v6(v6) || is_link_local_v6(v6),
    }
}

/// 100.64.0.0/10, carrier-grade NAT: inside someone's network.
fn is_shared_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (64..128).contains(&b)
}

fn is_unique_local_v6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xfe00 == 0xfc00
}

fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// A DNS resolver for the webhook client that drops the addresses the policy refuses, and fails
/// when none is left: the connection can only go where the policy allows.
pub struct PolicyResolver(pub NetworkPolicy);

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut reasons = Vec::new();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match refusal(policy, addr.ip()) {
                    Some(reason) => {
                        reasons.push(reason);
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let why = reasons.first().cloned().unwrap_or_else(|| "it has no address".into());
                return Err(format!("refused to call {host}: {why}").into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: NetworkPolicy = NetworkPolicy { allow_loopback: false, allow_private: false };

    fn refused(policy: NetworkPolicy, ip: &str) -> bool {
        refusal(policy, ip.parse().unwrap()).is_some()
    }

    #[test]
    fn inside_addresses_are_refused_by_default() {
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(refused(STRICT, ip), "{ip} should be refused");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "172.32.0.1", "100.128.0.1"] {
            assert!(!refused(STRICT, ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn settings_open_exactly_their_ranges() {
        let loopback = NetworkPolicy { allow_loopback: true, allow_private: false };
        assert!(!refused(loopback, "127.0.0.1") && !refused(loopback, "::1"));
        assert!(refused(loopback, "10.0.0.1"));
        let private = NetworkPolicy { allow_loopback: false, allow_private: true };
        assert!(!refused(private, "10.0.0.1") && !refused(private, "169.254.169.254"));
        assert!(refused(private, "127.0.0.1"));
        assert!(refusal(STRICT, "127.0.0.1".parse().unwrap()).unwrap().contains("KEEL_WEBHOOK_ALLOW_LOOPBACK"));
        let everything = NetworkPolicy { allow_loopback: true, allow_private: true };
        assert!(refused(everything, "0.0.0.0"), "never a unicast address");
    }
}
