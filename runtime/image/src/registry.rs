//! Which endpoints to pull from for a registry: configured mirrors in
//! order, then the registry itself. Registries on loopback are reached
//! over plain HTTP with no configuration, as containerd does.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Per-registry settings (the `[registries."<host>"]` table of the
/// daemon's config, in the spirit of containerd's hosts.toml).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Mirrors tried in order before the registry itself, as URLs
    /// (`http://127.0.0.1:5000`, `https://mirror.example`).
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Reach the registry itself over plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// A CA bundle to trust for it and its mirrors (PEM file).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL, `scheme://host[:port]`.
    pub url: String,
    /// Whether it is a mirror (else the registry itself).
    pub mirror: bool,
    /// Extra CA bundle (PEM) to trust for it.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The host part of `host[:port]` or `[v6]:port`.
fn host_of(registry: &str) -> &str {
    if registry.parse::<IpAddr>().is_ok() {
        return registry; // a bare IPv6 address: its colons are not a port
    }
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map_or(registry, |(h, _)| h)
}

/// True for `localhost`, 127.0.0.0/8 and ::1, with or without a port.
pub fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Where a registry named in an image reference is actually served.
fn upstream_host(registry: &str) -> &str {
    if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    }
}

/// The endpoints to try for `registry`, in order.
pub fn endpoints(registry: &str, configs: &BTreeMap<String, RegistryConfig>) -> Vec<Endpoint> {
    let cfg = configs.get(registry).cloned().unwrap_or_default();
    let mut out: Vec<Endpoint> = cfg
        .mirrors
        .iter()
        .map(|m| Endpoint {
            url: m.trim_end_matches('/').to_string(),
            mirror: true,
            ca_file: cfg.ca_file.clone(),
        })
        .collect();
    let scheme = if cfg.insecure || is_loopback(registry) {
        "http"
    } else {
        "https"
    };
    out.push(Endpoint {
        url: format!("{scheme}://{}", upstream_host(registry)),
        mirror: false,
        ca_file: cfg.ca_file.clone(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_need_no_configuration() {
        for r in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.9.9",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(r), "{r}");
            assert!(
                endpoints(r, &BTreeMap::new())[0].url.starts_with("http://"),
                "{r}"
            );
        }
        for r in [
            "registry.k8s.io",
            "10.0.0.1:5000",
            "localhost.evil.com",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback(r), "{r}");
            assert!(
                endpoints(r, &BTreeMap::new())[0]
                    .url
                    .starts_with("https://"),
                "{r}"
            );
        }
    }

    #[test]
    fn mirrors_come_first_in_order_then_the_registry() {
        let cfg: BTreeMap<String, RegistryConfig> = toml_like(&[(
            "registry.k8s.io",
            RegistryConfig {
                mirrors: vec!["http://127.0.0.1:5000/".into(), "https://m2.example".into()],
                ..Default::default()
            },
        )]);
        let e = endpoints("registry.k8s.io", &cfg);
        assert_eq!(
            e.iter()
                .map(|e| (e.url.as_str(), e.mirror))
                .collect::<Vec<_>>(),
            vec![
                ("http://127.0.0.1:5000", true),
                ("https://m2.example", true),
                ("https://registry.k8s.io", false)
            ]
        );
    }

    #[test]
    fn insecure_flag_and_docker_hub_upstream() {
        let cfg = toml_like(&[(
            "reg.lan:5000",
            RegistryConfig {
                insecure: true,
                ..Default::default()
            },
        )]);
        assert_eq!(
            endpoints("reg.lan:5000", &cfg)[0].url,
            "http://reg.lan:5000"
        );
        assert_eq!(
            endpoints("docker.io", &BTreeMap::new())[0].url,
            "https://registry-1.docker.io"
        );
    }

    fn toml_like(items: &[(&str, RegistryConfig)]) -> BTreeMap<String, RegistryConfig> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}
