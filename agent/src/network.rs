//! The pod's network inside the VM. The host ran CNI in the pod's network
//! namespace and redirects that interface's frames to the VM's NIC; the
//! agent gives the NIC the same addresses, MTU and routes, over rtnetlink,
//! so the pod sees the network CNI made for it.

use std::collections::HashMap;
use std::net::IpAddr;
use thiserror::Error;
use vmcri_proto::agent::v1 as pb;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The most interfaces and routes one request may carry: a pod has one
/// NIC and a handful of routes.
const MAX_INTERFACES: usize = 8;
const MAX_ROUTES: usize = 64;
const MAX_ADDRESSES: usize = 16;

/// Errors configuring the guest's network.
#[derive(Debug, Error)]
pub enum NetError {
    /// The request is malformed (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// No interface matches (FailedPrecondition).
    #[error("{0}")]
    NoSuchLink(String),
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Cause.
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Io(#[from] std::io::Error),
}

/// An interface as the host asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The name it should have (`eth0`).
    pub name: String,
    /// Its MAC, which finds the NIC; without one, the name does.
    pub mac: Option<[u8; 6]>,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// MTU, if the host set one.
    pub mtu: Option<u32>,
}

/// A route as the host asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub destination: (IpAddr, u8),
    /// Next hop, if not on-link.
    pub gateway: Option<IpAddr>,
    /// The interface it leaves through, by name, if given.
    pub device: Option<String>,
}

/// A validated network configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetConfig {
    /// Interfaces, configured in order.
    pub interfaces: Vec<Interface>,
    /// Routes, added after every interface is up.
    pub routes: Vec<Route>,
}

/// Parses `10.1.2.3/24`, `fd00::5/64`, or `default` (with `v6` choosing
/// the family of a bare `default`).
fn parse_cidr(s: &str, v6: bool) -> Result<(IpAddr, u8), NetError> {
    let s = s.trim();
    if s == "default" || s.is_empty() {
        let any: IpAddr = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        return Ok((any, 0));
    }
    let bad = || NetError::Invalid(format!("{s:?} is not an address with a prefix length"));
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((addr, len))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::Invalid(format!("{s:?} is not a MAC address"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn valid_ifname(name: &str) -> bool {
    // IFNAMSIZ is 16 with the NUL; '/' and whitespace are refused by the
    // kernel too, but a clear message beats EINVAL.
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

impl NetConfig {
    /// Validates the host's request.
    pub fn from_request(
        interfaces: &[pb::Interface],
        routes: &[pb::Route],
    ) -> Result<NetConfig, NetError> {
        if interfaces.len() > MAX_INTERFACES || routes.len() > MAX_ROUTES {
            return Err(NetError::Invalid(format!(
                "at most {MAX_INTERFACES} interfaces and {MAX_ROUTES} routes, not {} and {}",
                interfaces.len(),
                routes.len()
            )));
        }
        let mut out = NetConfig::default();
        for i in interfaces {
            if !valid_ifname(&i.name) {
                return Err(NetError::Invalid(format!(
                    "{:?} is not an interface name",
                    i.name
                )));
            }
            if i.addresses.len() > MAX_ADDRESSES {
                return Err(NetError::Invalid(format!(
                    "interface {}: at most {MAX_ADDRESSES} addresses",
                    i.name
                )));
            }
            let mac = if i.mac_address.is_empty() {
                None
            } else {
                Some(parse_mac(&i.mac_address)?)
            };
            let addresses = i
                .addresses
                .iter()
                .map(|a| parse_cidr(a, false))
                .collect::<Result<Vec<_>, _>>()?;
            // 68 is IPv4's minimum; the largest a virtio NIC takes is 65535.
            let mtu = match i.mtu {
                0 => None,
                m @ 68..=65535 => Some(m),
                m => {
                    return Err(NetError::Invalid(format!(
                        "interface {}: MTU {m} is out of range",
                        i.name
                    )))
                }
            };
            out.interfaces.push(Interface {
                name: i.name.clone(),
                mac,
                addresses,
                mtu,
            });
        }
        for r in routes {
            let gateway = if r.gateway.is_empty() {
                None
            } else {
                Some(r.gateway.parse::<IpAddr>().map_err(|_| {
                    NetError::Invalid(format!("{:?} is not a gateway address", r.gateway))
                })?)
            };
            let v6 = gateway.is_some_and(|g| g.is_ipv6());
            let destination = parse_cidr(&r.destination, v6)?;
            if gateway.is_some_and(|g| g.is_ipv4() != destination.0.is_ipv4()) {
                return Err(NetError::Invalid(format!(
                    "route to {}: the gateway {} is of another family",
                    r.destination, r.gateway
                )));
            }
            let device = if r.device.is_empty() {
                None
            } else if valid_ifname(&r.device) {
                Some(r.device.clone())
            } else {
                return Err(NetError::Invalid(format!(
                    "{:?} is not an interface name",
                    r.device
                )));
            };
            out.routes.push(Route {
                destination,
                gateway,
                device,
            });
        }
        Ok(out)
    }
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// A link's index, name and MAC.
struct Link {
    index: u32,
    name: String,
    mac: Option<Vec<u8>>,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(m) => link.mac = Some(m.clone()),
            _ => {}
        }
    }
    link
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing links"))?;
    Ok(msgs.iter().map(link_of).collect())
}

/// Applies `cfg` to this network namespace: each interface (found by MAC,
/// else by name) gets its name, MTU and addresses and is brought up; then
/// the routes are added, replacing any to the same destination. Applying
/// the same configuration twice changes nothing.
pub async fn apply(cfg: &NetConfig) -> Result<(), NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let result = apply_with(&handle, cfg).await;
    conn.abort();
    result
}

async fn apply_with(handle: &Handle, cfg: &NetConfig) -> Result<(), NetError> {
    let existing = links(handle).await?;
    let mut by_name: HashMap<String, u32> =
        existing.iter().map(|l| (l.name.clone(), l.index)).collect();
    for want in &cfg.interfaces {
        let found = existing.iter().find(|l| match want.mac {
            Some(mac) => l.mac.as_deref() == Some(&mac[..]),
            None => l.name == want.name,
        });
        let Some(link) = found else {
            return Err(NetError::NoSuchLink(match want.mac {
                Some(m) => format!(
                    "no interface has MAC {} (for {})",
                    m.map(|b| format!("{b:02x}")).join(":"),
                    want.name
                ),
                None => format!("no interface is named {}", want.name),
            }));
        };
        let index = link.index;
        if link.name != want.name {
            // A link is renamed only while it is down.
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .down()
                        .name(want.name.clone())
                        .build(),
                )
                .execute()
                .await
                .map_err(netlink(format!("renaming {} to {}", link.name, want.name)))?;
            by_name.remove(&link.name);
            by_name.insert(want.name.clone(), index);
        }
        if let Some(mtu) = want.mtu {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
                .execute()
                .await
                .map_err(netlink(format!("setting {}'s MTU to {mtu}", want.name)))?;
        }
        for &(addr, len) in &want.addresses {
            let mut req = handle.address().add(index, addr, len).replace();
            if addr.is_ipv6() {
                // The address is the pod's by CNI's word; duplicate address
                // detection would only hold the pod's first packets back.
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(netlink(format!("adding {addr}/{len} to {}", want.name)))?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("bringing {} up", want.name)))?;
    }
    for r in &cfg.routes {
        let (dst, len) = r.destination;
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .map_err(|e| NetError::Invalid(format!("route to {dst}/{len}: {e}")))?;
        if let Some(gw) = r.gateway {
            b = b
                .gateway(gw)
                .map_err(|e| NetError::Invalid(format!("route to {dst}/{len}: {e}")))?;
        }
        if let Some(dev) = &r.device {
            let index = by_name.get(dev).copied().ok_or_else(|| {
                NetError::NoSuchLink(format!("route to {dst}/{len}: no interface is named {dev}"))
            })?;
            b = b.output_interface(index);
        }
        handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("adding the route to {dst}/{len}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, addrs: &[&str], mtu: u32) -> pb::Interface {
        pb::Interface {
            name: name.into(),
            mac_address: mac.into(),
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            mtu,
        }
    }

    fn route(dst: &str, gw: &str, dev: &str) -> pb::Route {
        pb::Route {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
        }
    }

    #[test]
    fn a_cni_shaped_request_parses() {
        let cfg = NetConfig::from_request(
            &[iface(
                "eth0",
                "0A:58:0a:f4:01:05",
                &["10.244.1.5/24", "fd00:10::5/64"],
                1450,
            )],
            &[
                route("0.0.0.0/0", "10.244.1.1", ""),
                route("default", "fd00:10::1", "eth0"),
            ],
        )
        .unwrap();
        let i = &cfg.interfaces[0];
        assert_eq!(i.mac, Some([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]));
        assert_eq!(i.addresses[0], ("10.244.1.5".parse().unwrap(), 24));
        assert_eq!(i.addresses[1], ("fd00:10::5".parse().unwrap(), 64));
        assert_eq!(i.mtu, Some(1450));
        assert_eq!(cfg.routes[0].destination, ("0.0.0.0".parse().unwrap(), 0));
        // A bare "default" takes the family of its gateway.
        assert_eq!(cfg.routes[1].destination, ("::".parse().unwrap(), 0));
        assert_eq!(cfg.routes[1].device.as_deref(), Some("eth0"));
    }

    #[test]
    fn malformed_requests_are_refused_with_what_is_wrong() {
        let bad = [
            (vec![iface("eth0", "0a:58", &[], 0)], vec![], "MAC"),
            (
                vec![iface("eth0", "0a:58:0a:f4:01:05:07", &[], 0)],
                vec![],
                "MAC",
            ),
            (
                vec![iface("eth0", "zz:58:0a:f4:01:05", &[], 0)],
                vec![],
                "MAC",
            ),
            (vec![iface("eth0", "", &["10.0.0.1"], 0)], vec![], "prefix"),
            (
                vec![iface("eth0", "", &["10.0.0.1/33"], 0)],
                vec![],
                "prefix",
            ),
            (
                vec![iface("eth0", "", &["fd00::1/129"], 0)],
                vec![],
                "prefix",
            ),
            (vec![iface("eth0", "", &[], 40)], vec![], "MTU"),
            (vec![iface("../x", "", &[], 0)], vec![], "interface name"),
            (
                vec![iface("a-very-long-name0", "", &[], 0)],
                vec![],
                "interface name",
            ),
            (vec![], vec![route("10.0.0.0/8", "fd00::1", "")], "family"),
            (vec![], vec![route("10.0.0.0/8", "nope", "")], "gateway"),
            (
                vec![],
                vec![route("10.0.0.0/8", "", "eth 0")],
                "interface name",
            ),
        ];
        for (ifaces, routes, what) in bad {
            let e = NetConfig::from_request(&ifaces, &routes).unwrap_err();
            assert!(
                matches!(e, NetError::Invalid(_)) && e.to_string().contains(what),
                "{ifaces:?} {routes:?}: {e}"
            );
        }
        let many = vec![iface("eth0", "", &[], 0); MAX_INTERFACES + 1];
        assert!(NetConfig::from_request(&many, &[]).is_err());
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (which
    /// needs root), so nothing the test configures touches the host's.
    fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .ok()
        .flatten()
    }

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip").args(args).output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => panic!("ip {args:?}: {e}"),
        }
    }

    #[test]
    fn a_nic_found_by_mac_gets_its_name_mtu_addresses_and_routes() {
        let outcome = in_fresh_netns(|| {
            let made = std::process::Command::new("ip")
                .args([
                    "link",
                    "add",
                    "nic7",
                    "address",
                    "0a:58:0a:f4:01:05",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "peer7",
                ])
                .status();
            if !made.is_ok_and(|s| s.success()) {
                return None;
            }
            let cfg = NetConfig::from_request(
                &[iface(
                    "eth0",
                    "0a:58:0a:f4:01:05",
                    &["10.244.1.5/24", "fd00:10::5/64"],
                    1400,
                )],
                &[
                    route("0.0.0.0/0", "10.244.1.1", ""),
                    route("10.96.0.0/12", "10.244.1.1", "eth0"),
                    route("default", "fd00:10::1", "eth0"),
                ],
            )
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(apply(&cfg)).unwrap();
            // Twice changes nothing and does not fail.
            rt.block_on(apply(&cfg)).unwrap();
            Some((
                ip(&["-o", "link", "show", "eth0"]),
                ip(&["-o", "addr", "show", "dev", "eth0"]),
                ip(&["route", "show"]),
                ip(&["-6", "route", "show", "default"]),
            ))
        });
        let Some(Some((link, addrs, routes, routes6))) = outcome else {
            eprintln!("skipped: needs root, network namespaces and veth");
            return;
        };
        assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
        assert!(addrs.contains("10.244.1.5/24"), "{addrs}");
        assert!(addrs.contains("fd00:10::5/64"), "{addrs}");
        assert!(
            routes.contains("default via 10.244.1.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes.contains("10.96.0.0/12 via 10.244.1.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes6.contains("default via fd00:10::1 dev eth0"),
            "{routes6}"
        );
    }

    #[test]
    fn a_missing_nic_is_named_in_the_error() {
        let outcome = in_fresh_netns(|| {
            let cfg = NetConfig::from_request(&[iface("eth0", "0a:58:0a:f4:01:09", &[], 0)], &[])
                .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(apply(&cfg)).unwrap_err().to_string()
        });
        let Some(msg) = outcome else {
            eprintln!("skipped: needs root and network namespaces");
            return;
        };
        assert!(msg.contains("0a:58:0a:f4:01:09"), "{msg}");
    }
}
