//! CNI results (spec 0.3.0 to 1.0.0) and errors, as plugins print them.
//!
//! Plain serde structs rather than a crate: the result is a small, stable
//! JSON shape, the Rust CNI crates we found are plugin-side or unmaintained,
//! and parsing it here lets every address be checked before it reaches a
//! record. The raw JSON travels on as `prevResult` untouched; these types
//! only read it.

use super::super::{Cidr, Dns, Interface, IpConfig, Route};
use serde::Deserialize;
use std::net::IpAddr;

/// Result versions whose shape these types read: 0.3.x, 0.4.0 and 1.0.0
/// only differ in `ips[].version` (gone in 1.0.0, ignored here).
pub const RESULT_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// A plugin's result, parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResult {
    cni_version: String,
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    dns: Option<RawDns>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Clone, Deserialize)]
struct RawIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawDns {
    #[serde(default)]
    nameservers: Vec<String>,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    search: Vec<String>,
    #[serde(default)]
    options: Vec<String>,
}

/// What a backend needs of a final result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Interfaces.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS.
    pub dns: Dns,
}

/// Parses and checks result `value`: a known version, every address
/// valid, every interface index in range.
pub fn parse(value: &serde_json::Value) -> Result<Parsed, String> {
    let raw: RawResult =
        serde_json::from_value(value.clone()).map_err(|e| format!("invalid CNI result: {e}"))?;
    if !RESULT_VERSIONS.contains(&raw.cni_version.as_str()) {
        return Err(format!(
            "CNI result version {:?} is not supported ({})",
            raw.cni_version,
            RESULT_VERSIONS.join(", ")
        ));
    }
    let gateway = |g: &Option<String>| -> Result<Option<IpAddr>, String> {
        match g.as_deref() {
            None | Some("") => Ok(None),
            Some(g) => g
                .parse()
                .map(Some)
                .map_err(|_| format!("invalid CNI result: gateway {g:?} is not an IP address")),
        }
    };
    let mut ips = Vec::new();
    for ip in &raw.ips {
        if let Some(i) = ip.interface {
            if i >= raw.interfaces.len() {
                return Err(format!(
                    "invalid CNI result: address {} names interface {i} of {}",
                    ip.address,
                    raw.interfaces.len()
                ));
            }
        }
        ips.push(IpConfig {
            address: ip
                .address
                .parse()
                .map_err(|e| format!("invalid CNI result: {e}"))?,
            gateway: gateway(&ip.gateway)?,
            interface: ip.interface,
        });
    }
    let mut routes = Vec::new();
    for r in &raw.routes {
        routes.push(Route {
            dst: r
                .dst
                .parse()
                .map_err(|e| format!("invalid CNI result: {e}"))?,
            gw: gateway(&r.gw)?,
        });
    }
    let dns = raw.dns.unwrap_or_default();
    Ok(Parsed {
        interfaces: raw
            .interfaces
            .into_iter()
            .map(|i| Interface {
                name: i.name,
                mac: i.mac,
                sandbox: i.sandbox,
            })
            .collect(),
        ips,
        routes,
        dns: Dns {
            nameservers: dns.nameservers,
            domain: dns.domain,
            search: dns.search,
            options: dns.options,
        },
    })
}

/// A plugin's error, as the spec's error JSON gives it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct PluginError {
    /// The error code (1-99 the spec's, 100+ the plugin's).
    #[serde(default)]
    pub code: u32,
    /// The message.
    #[serde(default)]
    pub msg: String,
    /// More detail.
    #[serde(default)]
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// The error JSON in a failed plugin's stdout, if it printed one.
pub fn plugin_error(stdout: &[u8]) -> Option<PluginError> {
    serde_json::from_slice::<PluginError>(stdout)
        .ok()
        .filter(|e| e.code != 0 || !e.msg.is_empty())
}

/// Cidr is also read from strings like "10.0.0.2/24".
impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an address with a prefix length"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address with a prefix length"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?} has an invalid prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{s:?} has a prefix length over {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn results_of_0_4_0_and_1_0_0_parse_alike() {
        let v040 = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/x"}],
            "ips": [{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc"]}
        });
        let mut v100 = v040.clone();
        v100["cniVersion"] = json!("1.0.0");
        v100["ips"][0].as_object_mut().unwrap().remove("version");
        let a = parse(&v040).unwrap();
        assert_eq!(a, parse(&v100).unwrap());
        assert_eq!(a.ips[0].address.to_string(), "10.244.1.5/24");
        assert_eq!(a.ips[0].gateway, Some("10.244.1.1".parse().unwrap()));
        assert_eq!(a.ips[0].interface, Some(1));
        assert_eq!(a.interfaces[1].sandbox, "/run/netns/x");
        assert_eq!(a.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(a.routes[0].gw, None);
        assert_eq!(a.dns.nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn bad_results_are_refused() {
        for bad in [
            json!({"cniVersion": "9.9.9"}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/33"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "nonsense/8"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "interface": 3}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "gateway": "x"}]}),
            json!({"cniVersion": "1.0.0", "routes": [{"dst": "default"}]}),
            json!("a string"),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        // A bare result with no addresses is valid (a loopback-only net).
        assert_eq!(
            parse(&json!({"cniVersion": "1.0.0"})).unwrap(),
            Parsed::default()
        );
    }

    #[test]
    fn the_error_json_is_read() {
        let e = plugin_error(
            br#"{"cniVersion":"1.0.0","code":11,"msg":"no addresses","details":"range full"}"#,
        )
        .unwrap();
        assert_eq!(e.to_string(), "no addresses (code 11): range full");
        assert_eq!(plugin_error(b"garbage"), None);
        assert_eq!(plugin_error(b"{}"), None);
    }
}
