//! The `--net fd=<N>,mac=<aa:bb:cc:dd:ee:ff>[,mtu=<M>]` argument.

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;
use thiserror::Error;

/// Smallest MTU an IPv4 host must accept (RFC 791).
pub const MIN_MTU: u16 = 68;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Errors in a `--net` argument.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetSpecError {
    /// Not `key=value`.
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    /// A key we do not know.
    #[error("unknown key {0:?} (known: fd, mac, mtu)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("{0} given twice")]
    Duplicate(&'static str),
    /// A required key is missing.
    #[error("{0}= is required")]
    Missing(&'static str),
    /// The fd is not a number of an fd we could own.
    #[error("fd={0:?} is not a file descriptor number (3 or more)")]
    BadFd(String),
    /// The MAC is malformed or not a unicast address.
    #[error("mac={0:?}: {1}")]
    BadMac(String, &'static str),
    /// The MTU is out of range.
    #[error("mtu={0:?} is not a number from {MIN_MTU} to 65535")]
    BadMtu(String),
}

/// What `--net` says: the tap's inherited fd and the guest NIC's MAC and
/// MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSpec {
    /// The tap, opened by the runtime and inherited across exec.
    pub fd: RawFd,
    /// The guest interface's MAC.
    pub mac: MacAddr,
    /// The MTU the guest should use, if the runtime set one.
    pub mtu: Option<u16>,
}

impl FromStr for MacAddr {
    type Err = NetSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| NetSpecError::BadMac(s.to_string(), why);
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(|| bad("needs six hex bytes"))?;
            if part.len() != 2 {
                return Err(bad("each byte is two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        if parts.next().is_some() {
            return Err(bad("needs six hex bytes"));
        }
        if mac[0] & 1 != 0 {
            return Err(bad("a multicast address cannot name an interface"));
        }
        if mac == [0; 6] {
            return Err(bad("the all-zero address cannot name an interface"));
        }
        Ok(MacAddr(mac))
    }
}

impl FromStr for NetSpec {
    type Err = NetSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut fd, mut mac, mut mtu) = (None, None, None);
        for item in s.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetSpecError::NotKeyValue(item.to_string()))?;
            match key {
                "fd" => {
                    let n = value
                        .parse::<RawFd>()
                        .ok()
                        .filter(|n| *n >= 3)
                        .ok_or_else(|| NetSpecError::BadFd(value.to_string()))?;
                    if fd.replace(n).is_some() {
                        return Err(NetSpecError::Duplicate("fd"));
                    }
                }
                "mac" => {
                    if mac.replace(value.parse::<MacAddr>()?).is_some() {
                        return Err(NetSpecError::Duplicate("mac"));
                    }
                }
                "mtu" => {
                    let m = value
                        .parse::<u16>()
                        .ok()
                        .filter(|m| *m >= MIN_MTU)
                        .ok_or_else(|| NetSpecError::BadMtu(value.to_string()))?;
                    if mtu.replace(m).is_some() {
                        return Err(NetSpecError::Duplicate("mtu"));
                    }
                }
                other => return Err(NetSpecError::UnknownKey(other.to_string())),
            }
        }
        Ok(NetSpec {
            fd: fd.ok_or(NetSpecError::Missing("fd"))?,
            mac: mac.ok_or(NetSpecError::Missing("mac"))?,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spec_parses() {
        let spec: NetSpec = "fd=7,mac=02:aa:bb:cc:dd:0e,mtu=1450".parse().unwrap();
        assert_eq!(
            spec,
            NetSpec {
                fd: 7,
                mac: MacAddr([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]),
                mtu: Some(1450)
            }
        );
        assert_eq!(spec.mac.to_string(), "02:aa:bb:cc:dd:0e");
        let spec: NetSpec = "mac=02:00:00:00:00:01,fd=3".parse().unwrap();
        assert_eq!(spec.mtu, None);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = |s: &str| s.parse::<NetSpec>().unwrap_err();
        assert_eq!(
            err("fd=3,mac=02:00:00:00:00:01,speed=10"),
            NetSpecError::UnknownKey("speed".into())
        );
        assert_eq!(err("mac=02:00:00:00:00:01"), NetSpecError::Missing("fd"));
        assert_eq!(err("fd=3"), NetSpecError::Missing("mac"));
        assert_eq!(
            err("fd=x,mac=02:00:00:00:00:01"),
            NetSpecError::BadFd("x".into())
        );
        assert_eq!(
            err("fd=1,mac=02:00:00:00:00:01"),
            NetSpecError::BadFd("1".into())
        );
        assert_eq!(
            err("fd=3,fd=4,mac=02:00:00:00:00:01"),
            NetSpecError::Duplicate("fd")
        );
        assert_eq!(err("fd=3,mac"), NetSpecError::NotKeyValue("mac".into()));
        assert_eq!(
            err("fd=3,mac=02:00:00:00:00:01,mtu=67"),
            NetSpecError::BadMtu("67".into())
        );
        assert_eq!(
            err("fd=3,mac=02:00:00:00:00:01,mtu=65536"),
            NetSpecError::BadMtu("65536".into())
        );
        for mac in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1",
            "02:00:00:00:00:zz",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "",
        ] {
            assert!(
                matches!(err(&format!("fd=3,mac={mac}")), NetSpecError::BadMac(..)),
                "{mac}"
            );
        }
    }
}
