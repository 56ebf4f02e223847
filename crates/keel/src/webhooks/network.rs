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

/// Why an address may not be called, naming the setting that would allow it. An IPv6 address that
/// carries an IPv4 address (see [`embedded_v4`]) is judged by that IPv4 address.
pub fn refusal(policy: NetworkPolicy, ip: IpAddr) -> Option<String> {
    let (ip, shown) = match ip {
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => (IpAddr::V4(v4), format!("{v6} (which carries {v4})")),
            None => (ip, ip.to_string()),
        },
        IpAddr::V4(_) => (ip, ip.to_string()),
    };
    let never = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if never {
        return Some(format!("{shown} is not a unicast address"));
    }
    if is_loopback(ip) && !policy.allow_loopback {
        return Some(format!("{shown} is a loopback address; set KEEL_WEBHOOK_ALLOW_LOOPBACK=true to allow it"));
    }
    if is_private(ip) && !policy.allow_private {
        return Some(format!(
            "{shown} is a private or link-local address; set KEEL_WEBHOOK_ALLOW_PRIVATE=true to allow it"
        ));
    }
    None
}

/// The IPv4 address an IPv6 address stands for, in the forms where the packet can end up at that
/// IPv4 address (through the host's own stack, a tunnel or a translator):
/// - IPv4-mapped, `::ffff:0:0/96`, and IPv4-compatible, `::/96` (but `::` and `::1` are IPv6's
///   own unspecified and loopback addresses): the last 32 bits;
/// - 6to4, `2002::/16`: bits 16 to 48;
/// - NAT64 with the well-known prefix, `64:ff9b::/96`: the last 32 bits.
///
/// The local-use NAT64 prefix `64:ff9b:1::/48` is not read: its operator chooses the prefix length
/// (/48 to /96), and so where in the address the IPv4 address sits; it is private instead.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let last = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(last),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last),
        _ => None,
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local() || is_shared_v4(v4),
        IpAddr::V6(v6) => {
            is_unique_local_v6(v6) || is_link_local_v6(v6) || is_site_local_v6(v6) || is_local_nat64_v6(v6)
        }
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

/// `fec0::/10`: deprecated (RFC 3879), but still a site's own range where it is in use.
fn is_site_local_v6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfec0
}

/// `64:ff9b:1::/48`, NAT64 for one network's own use (RFC 8215): leads to IPv4 addresses inside
/// that network, at a place in the address its operator chooses.
fn is_local_nat64_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1
}

/// A webhook URL as a log line may show it: scheme, host and port. The rest can hold secrets: user
/// info (`https://user:pass@…`), the query (`?token=…`), and often the path too (catch-hook URLs
/// such as `/hooks/catch/123/abcdef/` are themselves the credential). Log the subscription's id
/// beside it: an admin finds the whole URL from that.
pub fn redacted(url: &str) -> String {
    let Ok(parsed) = reqwest::Url::parse(url) else { return "(not a URL)".to_owned() };
    let host = parsed.host_str().unwrap_or_default();
    match parsed.port() {
        Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    }
}

/// `text` (an error message: reqwest's quote the URL whole) with the URL in it redacted.
pub fn redacted_in(text: &str, url: &str) -> String {
    if url.is_empty() {
        return text.to_owned();
    }
    let short = redacted(url);
    let mut text = text.replace(url, &short);
    if let Ok(parsed) = reqwest::Url::parse(url) {
        text = text.replace(parsed.as_str(), &short);
    }
    text
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
    fn logged_urls_keep_only_scheme_host_and_port() {
        let url = "https://user:pa55@hooks.example.org:8443/hooks/catch/123/abcdef?token=s3cret#frag";
        assert_eq!(redacted(url), "https://hooks.example.org:8443");
        assert_eq!(redacted("http://example.org/hook?token=s3cret"), "http://example.org");
        assert_eq!(redacted("https://example.org:443/"), "https://example.org", "the default port is implied");
        assert_eq!(redacted("http://[::1]:9000/x"), "http://[::1]:9000");
        assert_eq!(redacted("not a url ?token=s3cret"), "(not a URL)");
        // An error quoting the URL, as reqwest's do.
        let error = format!("error sending request for url ({url}): connection refused");
        let clean = redacted_in(&error, url);
        assert_eq!(clean, "error sending request for url (https://hooks.example.org:8443): connection refused");
        // The URL as reqwest writes it back (normalised) is caught too.
        let loose = "HTTPS://user:pa55@Hooks.Example.org/a/../hook?token=s3cret";
        let quoted = format!("for url ({})", reqwest::Url::parse(loose).unwrap());
        assert_eq!(redacted_in(&quoted, loose), "for url (https://hooks.example.org)");
        assert_eq!(redacted_in("nothing to hide", ""), "nothing to hide");
    }

    /// IPv6 forms that carry an IPv4 address are judged by that address: otherwise `[::7f00:1]` or
    /// `[64:ff9b::a9fe:a9fe]` would reach 127.0.0.1 or the metadata service past the policy.
    #[test]
    fn ipv6_forms_carrying_an_ipv4_address_are_judged_by_it() {
        for ip in [
            // IPv4-compatible ::/96.
            "::7f00:1",
            "::a9fe:a9fe",
            "::a00:1",
            "::e000:1",
            // IPv4-mapped ::ffff:0:0/96.
            "::ffff:7f00:1",
            "::ffff:a9fe:a9fe",
            // 6to4 2002::/16: the IPv4 address is bits 16 to 48.
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101:1::1",
            "2002:6440:1::",
            "2002::",
            // NAT64 64:ff9b::/96: the last 32 bits.
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::a00:5",
            "64:ff9b::ffff:ffff",
        ] {
            assert!(refused(STRICT, ip), "{ip} should be refused");
        }
        for ip in ["::808:808", "::ffff:808:808", "2002:808:808::", "2002:5db8:d822::1", "64:ff9b::808:808"] {
            assert!(!refused(STRICT, ip), "{ip} carries a public address and should be allowed");
        }
        // The reason names both the address and what it carries.
        let reason = refusal(STRICT, "2002:7f00:1::".parse().unwrap()).unwrap();
        assert!(reason.contains("2002:7f00:1::") && reason.contains("127.0.0.1"), "{reason}");
        assert!(reason.contains("KEEL_WEBHOOK_ALLOW_LOOPBACK"), "{reason}");
        // The settings open what they open for the IPv4 address itself, and nothing more.
        let loopback = NetworkPolicy { allow_loopback: true, allow_private: false };
        assert!(!refused(loopback, "::7f00:1") && !refused(loopback, "64:ff9b::7f00:1"));
        assert!(refused(loopback, "::a9fe:a9fe") && refused(loopback, "2002:a00:1::"));
        let private = NetworkPolicy { allow_loopback: false, allow_private: true };
        assert!(!refused(private, "2002:a00:1::") && refused(private, "2002:7f00:1::"));
        // `::` and `::1` are IPv6's own unspecified and loopback addresses, not 0.0.0.0 and 0.0.0.1.
        assert!(!refused(loopback, "::1"));
        assert!(refusal(STRICT, "::1".parse().unwrap()).unwrap().contains("loopback"));
    }

    /// Ranges that lead inside a site, whatever the address in them.
    #[test]
    fn site_local_and_local_use_nat64_addresses_are_private() {
        for ip in ["fec0::1", "feff:ffff::1", "64:ff9b:1::808:808", "64:ff9b:1:ffff::1"] {
            assert!(refused(STRICT, ip), "{ip} should be refused");
            let private = NetworkPolicy { allow_loopback: false, allow_private: true };
            assert!(!refused(private, ip), "{ip} is private: KEEL_WEBHOOK_ALLOW_PRIVATE opens it");
        }
        // Just outside the local-use NAT64 /48.
        assert!(!refused(STRICT, "64:ff9b:2::1") && !refused(STRICT, "64:ff9a:1::1"));
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
