//! The files a pod gives each of its containers: /etc/hosts,
//! /etc/resolv.conf (from the CRI DNSConfig, or the host's when kubelet
//! gives none, as containerd does) and /etc/hostname. Written once at
//! RunPodSandbox; in a microVM they sit in the pod's share.

use k8s_cri::v1 as cri;
use std::net::IpAddr;
use std::path::Path;

/// The files and the container paths they are mounted on.
pub const FILES: &[(&str, &str)] = &[
    ("hosts", "/etc/hosts"),
    ("resolv.conf", "/etc/resolv.conf"),
    ("hostname", "/etc/hostname"),
];

/// Checks a DNS config: servers are IP addresses, searches and options
/// single words.
pub fn validate_dns(dns: &cri::DnsConfig) -> Result<(), String> {
    for s in &dns.servers {
        s.parse::<IpAddr>()
            .map_err(|_| format!("DNS server {s:?} is not an IP address"))?;
    }
    for w in dns.searches.iter().chain(&dns.options) {
        if w.is_empty() || w.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("invalid DNS search or option {w:?}"));
        }
    }
    if dns.searches.len() > 32 {
        return Err("more than 32 DNS search domains".into());
    }
    Ok(())
}

/// resolv.conf for `dns`, or the host's without one.
pub fn resolv_conf(dns: Option<&cri::DnsConfig>) -> String {
    let Some(dns) = dns else {
        return std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    };
    let mut out = String::new();
    for s in &dns.servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// /etc/hosts for a pod named `hostname`.
pub fn hosts(hostname: &str) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    out
}

/// Writes the pod's files into `dir`.
pub fn write(dir: &Path, hostname: &str, dns: Option<&cri::DnsConfig>) -> std::io::Result<()> {
    crate::store::private_dirs(dir)?;
    std::fs::write(dir.join("hosts"), hosts(hostname))?;
    std::fs::write(dir.join("resolv.conf"), resolv_conf(dns))?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_follows_the_dns_config() {
        let dns = cri::DnsConfig {
            servers: vec!["10.0.0.10".into(), "fd00::a".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert!(validate_dns(&dns).is_ok());
        assert_eq!(
            resolv_conf(Some(&dns)),
            "nameserver 10.0.0.10\nnameserver fd00::a\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        for bad in [
            cri::DnsConfig {
                servers: vec!["dns.example".into()],
                ..Default::default()
            },
            cri::DnsConfig {
                searches: vec!["two words".into()],
                ..Default::default()
            },
            cri::DnsConfig {
                options: vec!["x\ny".into()],
                ..Default::default()
            },
        ] {
            assert!(validate_dns(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_names_the_pod() {
        assert!(hosts("web").contains("127.0.1.1\tweb\n"));
        assert!(!hosts("").contains("127.0.1.1"));
    }
}
