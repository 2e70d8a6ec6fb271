//! Connects a microVM to the network CNI made for its pod, as Kata's
//! tcfilter model and firecracker-containerd's tc-redirect-tap do: a tap
//! beside the CNI interface in the pod's network namespace, and a tc
//! ingress redirect each way between the two, so every frame the bridge
//! sends the pod reaches the VM unchanged and every frame the VM sends
//! leaves through the CNI interface. The VM's NIC takes the CNI
//! interface's MAC and the guest its addresses, so to the rest of the
//! cluster the pod is exactly what CNI made.
//!
//! The tap is opened here and its fd handed to the VMM, which keeps its
//! own empty network namespace and never touches the pod's. The tap is
//! not persistent: it goes when the VMM does.

use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use vmcri_proto::agent::v1 as pb;

use futures_util::TryStreamExt;

/// The tap's name inside the pod's network namespace.
pub const TAP_NAME: &str = "vmtap0";

/// `_IOW('T', 202, int)`: attaches the fd to a tun/tap device, creating it.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// tc's handle of the ingress qdisc (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// `ETH_P_ALL` (0x0003) in network byte order, as tc filters want their
/// protocol.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();

/// Errors connecting a VM to its pod network.
#[derive(Debug, Error)]
pub enum NetError {
    /// The pod's network namespace could not be entered.
    #[error("entering the pod's network namespace {path}: {source}")]
    Netns {
        /// The bind-mounted namespace.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The CNI interface is not in the namespace.
    #[error("the pod's network namespace has no interface {0} (CNI made none?)")]
    NoInterface(String),
    /// The tap could not be made.
    #[error("creating the tap {TAP_NAME}: {0}")]
    Tap(std::io::Error),
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Cause.
        source: rtnetlink::Error,
    },
    /// Anything else the setup thread met.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A VM's link to its pod network.
#[derive(Debug)]
pub struct VmNic {
    /// The tap (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR), for the VMM's `--net`.
    pub tap: OwnedFd,
    /// The CNI interface's MAC, which the VM's NIC takes.
    pub mac: [u8; 6],
    /// The CNI interface's MTU.
    pub mtu: u32,
}

impl VmNic {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The guest's side of the pod network: the NIC, found by the MAC the VMM
/// gives it, named and addressed as CNI's interface is.
pub fn guest_interface(nic: &VmNic, ifname: &str, addresses: Vec<String>) -> pb::Interface {
    pb::Interface {
        name: ifname.to_owned(),
        mac_address: nic.mac_string(),
        addresses,
        mtu: nic.mtu,
    }
}

/// The VMM's `--net` value for `nic`, whose fd the VMM inherits as `fd`.
pub fn vmm_arg(nic: &VmNic, fd: i32) -> String {
    format!("fd={fd},mac={},mtu={}", nic.mac_string(), nic.mtu)
}

/// Lets `fd` survive exec, in a forked child before it execs (only
/// async-signal-safe calls).
pub fn inherit(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd number; F_SETFD with 0 only clears FD_CLOEXEC.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Makes the tap beside `ifname` in the network namespace bind-mounted at
/// `netns`, redirects the two into each other, and returns the tap's fd
/// with the interface's MAC and MTU. Blocking: it runs on a thread of its
/// own, which is the only one to enter the pod's namespace.
pub fn connect(netns: &Path, ifname: &str) -> Result<VmNic, NetError> {
    let netns = netns.to_path_buf();
    let ifname = ifname.to_owned();
    std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            enter(&netns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // The netlink socket is made here, after setns: a socket
            // belongs to the namespace it was created in.
            rt.block_on(connect_here(&ifname))
        })?
        .join()
        .map_err(|_| NetError::Io(std::io::Error::other("the pod-netns thread panicked")))?
}

/// Moves this thread into the namespace bind-mounted at `path`.
fn enter(path: &Path) -> Result<(), NetError> {
    let err = |source| NetError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let ns = File::open(path).map_err(err)?;
    // SAFETY: setns on an fd we hold; CLONE_NEWNET moves only this thread,
    // which exists for this call and ends with it.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What `ifname` is: its index, MAC and MTU.
async fn find(handle: &Handle, ifname: &str) -> Result<(u32, [u8; 6], u32), NetError> {
    let msgs: Vec<LinkMessage> = match handle
        .link()
        .get()
        .match_name(ifname.to_owned())
        .execute()
        .try_collect()
        .await
    {
        Ok(m) => m,
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            return Err(NetError::NoInterface(ifname.into()))
        }
        Err(e) => return Err(netlink(format!("looking up {ifname}"))(e)),
    };
    let msg = msgs
        .first()
        .ok_or_else(|| NetError::NoInterface(ifname.into()))?;
    let mut mac = None;
    let mut mtu = 1500;
    for a in &msg.attributes {
        match a {
            LinkAttribute::Address(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mac = mac.ok_or_else(|| {
        NetError::Io(std::io::Error::other(format!(
            "{ifname} has no Ethernet address; only Ethernet CNI interfaces can reach a VM"
        )))
    })?;
    Ok((msg.header.index, mac, mtu))
}

async fn connect_here(ifname: &str) -> Result<VmNic, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let result = async {
        let (veth, mac, mtu) = find(&handle, ifname).await?;
        let tap = open_tap(TAP_NAME).map_err(NetError::Tap)?;
        let (tap_index, _, _) = find(&handle, TAP_NAME).await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(netlink(format!("bringing {TAP_NAME} up")))?;
        redirect(&handle, veth, tap_index, ifname, TAP_NAME).await?;
        redirect(&handle, tap_index, veth, TAP_NAME, ifname).await?;
        Ok(VmNic { tap, mac, mtu })
    }
    .await;
    conn.abort();
    result
}

/// `tc qdisc add dev FROM ingress` and `tc filter add dev FROM parent
/// ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev
/// TO`.
async fn redirect(
    handle: &Handle,
    from: u32,
    to: u32,
    from_name: &str,
    to_name: &str,
) -> Result<(), NetError> {
    let from_i32 = i32::try_from(from)
        .map_err(|_| std::io::Error::other(format!("{from_name} has index {from}")))?;
    handle
        .qdisc()
        .add(from_i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!("adding an ingress qdisc to {from_name}")))?;
    handle
        .traffic_filter(from_i32)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(ETH_P_ALL_BE)
        .redirect(to)
        .map_err(netlink(format!(
            "building the {from_name} -> {to_name} redirect"
        )))?
        .execute()
        .await
        .map_err(netlink(format!("redirecting {from_name} to {to_name}")))?;
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to a new tap called `name`, with
/// no packet-info prefix and with virtio-net headers (the VMM offloads
/// checksums and TSO through them).
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let tun = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _rest: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("{name} is too long a name")));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
        .map_err(std::io::Error::other)?;
    // SAFETY: TUNSETIFF reads a struct ifreq, which `req` is laid out as,
    // and writes the chosen name back into it; both outlive the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A network namespace of the test's own, bind-mounted like a pod's;
    /// `None` where this host cannot make one (not root).
    struct Fixture {
        pod_ns: PathBuf,
    }

    fn run(args: &[&str]) -> bool {
        Command::new(args[0])
            .args(&args[1..])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn output(args: &[&str]) -> String {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    impl Fixture {
        fn new(name: &str) -> Option<Fixture> {
            let pod_ns = PathBuf::from(format!("/run/netns/{name}"));
            if !run(&["ip", "netns", "add", name]) {
                return None;
            }
            Some(Fixture { pod_ns })
        }
        fn name(&self) -> &str {
            self.pod_ns
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        }
        fn ip(&self, args: &[&str]) -> bool {
            let mut v = vec!["ip", "-n", self.name()];
            v.extend_from_slice(args);
            run(&v)
        }
        fn ip_out(&self, args: &[&str]) -> String {
            let mut v = vec!["ip", "-n", self.name()];
            v.extend_from_slice(args);
            output(&v)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = run(&["ip", "netns", "del", self.name()]);
        }
    }

    #[test]
    fn a_missing_namespace_or_interface_is_named() {
        let e = connect(Path::new("/nonexistent/netns"), "eth0").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
        let Some(fx) = Fixture::new(&format!("vmcri-nettest-{}-a", std::process::id())) else {
            eprintln!("skipped: needs root and `ip netns`");
            return;
        };
        let e = connect(&fx.pod_ns, "eth0").unwrap_err();
        assert!(matches!(e, NetError::NoInterface(_)), "{e}");
    }

    /// Frames sent to the CNI interface come out of the tap fd with a
    /// virtio-net header, and frames written to the tap fd leave through
    /// the CNI interface: the whole data path of a VM's NIC, without the
    /// VM. Everything stays in two namespaces the test makes.
    #[test]
    fn frames_cross_between_the_cni_interface_and_the_tap() {
        let pid = std::process::id();
        let Some(fx) = Fixture::new(&format!("vmcri-nettest-{pid}-b")) else {
            eprintln!("skipped: needs root and `ip netns`");
            return;
        };
        // The "bridge side": a second namespace holding the veth's peer.
        let Some(peer) = Fixture::new(&format!("vmcri-nettest-{pid}-c")) else {
            panic!("could make one namespace but not a second");
        };
        assert!(peer.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            "0a:58:0a:f4:07:05",
            "mtu",
            "1400",
            "netns",
            fx.name(),
            "type",
            "veth",
            "peer",
            "name",
            "br0",
        ]));
        assert!(peer.ip(&["link", "set", "br0", "up"]));
        assert!(peer.ip(&["addr", "add", "10.244.7.1/24", "dev", "br0"]));
        assert!(fx.ip(&["link", "set", "eth0", "up"]));

        let nic = connect(&fx.pod_ns, "eth0").unwrap();
        assert_eq!(nic.mac_string(), "0a:58:0a:f4:07:05");
        assert_eq!(nic.mtu, 1400);
        let tap_link = fx.ip_out(&["-o", "link", "show", TAP_NAME]);
        assert!(tap_link.contains("mtu 1400"), "{tap_link}");
        let filters = fx.ip_out(&["-d", "link", "show"]);
        assert!(!filters.is_empty());
        let tc = output(&[
            "tc",
            "-n",
            fx.name(),
            "filter",
            "show",
            "dev",
            "eth0",
            "ingress",
        ]);
        assert!(tc.contains("mirred") && tc.contains(TAP_NAME), "{tc}");

        // Bridge side -> pod: an ARP request for the pod's address comes
        // out of the tap, after a 10-byte virtio-net header (the tap's
        // default header size; the VMM makes it 12). IPv6 chatter may
        // come first.
        let pinger = std::thread::spawn({
            let name = peer.name().to_owned();
            move || {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &name,
                    "busybox",
                    "ping",
                    "-c",
                    "3",
                    "-W",
                    "1",
                    "10.244.7.5",
                ])
            }
        });
        let tap = File::from(nic.tap.try_clone().unwrap());
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let arp = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let n = read_with_timeout(&tap, &mut buf, left)
                .expect("an ARP request from the bridge side reaches the tap");
            let frame = &buf[10..n];
            if frame.len() >= 14 && frame[12..14] == [0x08, 0x06] {
                break frame.to_vec();
            }
        };
        assert_eq!(&arp[0..6], &[0xff; 6], "broadcast");
        let _ = pinger.join();

        // Pod -> bridge side: a broadcast frame written to the tap leaves
        // through eth0 and is counted on br0.
        let before = rx_packets(&peer, "br0");
        let mut out = vec![0u8; 10];
        out.extend_from_slice(&[0xff; 6]);
        out.extend_from_slice(&nic.mac);
        out.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        out.extend_from_slice(&[0u8; 46]);
        let w = {
            use std::io::Write;
            (&tap).write(&out)
        };
        assert_eq!(w.unwrap(), out.len());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            rx_packets(&peer, "br0") > before,
            "the frame reached the bridge side"
        );
    }

    fn rx_packets(fx: &Fixture, dev: &str) -> u64 {
        let s = fx.ip_out(&["-s", "-o", "link", "show", dev]);
        // "... RX: bytes packets ...\    <bytes> <packets> ..."
        s.split("RX:")
            .nth(1)
            .and_then(|r| r.split('\\').nth(1))
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn read_with_timeout(f: &File, buf: &mut [u8], within: std::time::Duration) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
            return None;
        }
        use std::io::Read;
        (&*f).read(buf).ok()
    }
}
