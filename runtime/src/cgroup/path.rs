//! Cgroup paths in kubelet's cgroupfs form (`/kubepods/burstable/pod<uid>`),
//! validated: `cgroup_parent` comes from the CRI request, and every path
//! built from it is joined to a cgroupfs mount the daemon writes as root.

use super::CgroupError;
use std::fmt;

/// Longest `cgroup_parent` accepted. kubelet's are under 100 bytes
/// (`/kubepods/burstable/pod` and a UID); this leaves room for deeper
/// custom trees while keeping every path well below PATH_MAX.
pub const MAX_PARENT_LEN: usize = 512;

/// The prefix of each pod cgroup's name: `<parent>/vmcri-<sandbox id>`.
pub const POD_PREFIX: &str = "vmcri-";

/// A validated absolute cgroup path: `/` or `/a/b`, each component made of
/// ASCII letters, digits and `_ . - + = @`, never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// `text` as a cgroup parent, refused with [`CgroupError::InvalidPath`]
    /// unless it is an absolute cgroupfs path. kubelet's systemd-driver
    /// form (`kubepods-burstable-pod<uid>.slice`) is refused by name:
    /// vmcri speaks cgroupfs only.
    pub fn parse(text: &str) -> Result<CgroupPath, CgroupError> {
        let invalid = |why: &str| CgroupError::InvalidPath(format!("cgroup_parent {text:?} {why}"));
        if text.len() > MAX_PARENT_LEN + POD_PREFIX.len() + 64 {
            return Err(invalid(&format!("is longer than {MAX_PARENT_LEN} bytes")));
        }
        if !text.starts_with('/') {
            if text.ends_with(".slice") || text.contains(':') {
                return Err(invalid(
                    "is in systemd form; vmcri supports kubelet's cgroupfs driver only \
                     (cgroupDriver: cgroupfs)",
                ));
            }
            return Err(invalid("must be an absolute path"));
        }
        if text == "/" {
            return Ok(CgroupPath(text.to_string()));
        }
        for c in text[1..].split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(invalid("must not have empty, '.' or '..' components"));
            }
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_.-+=@".contains(&b);
            if !c.bytes().all(allowed) {
                return Err(invalid(
                    "may only hold ASCII letters, digits, '/' and '_' '.' '-' '+' '=' '@'",
                ));
            }
        }
        Ok(CgroupPath(text.to_string()))
    }

    /// A parent as RunPodSandbox gives it: [`CgroupPath::parse`], bounded
    /// by [`MAX_PARENT_LEN`]; `None` when empty (the caller's default).
    pub fn parent(text: &str) -> Result<Option<CgroupPath>, CgroupError> {
        if text.is_empty() {
            return Ok(None);
        }
        if text.len() > MAX_PARENT_LEN {
            return Err(CgroupError::InvalidPath(format!(
                "cgroup_parent is longer than {MAX_PARENT_LEN} bytes"
            )));
        }
        CgroupPath::parse(text).map(Some)
    }

    /// The cgroup of sandbox `sandbox_id` under this parent.
    pub fn pod(&self, sandbox_id: &str) -> CgroupPath {
        let base = self.0.trim_end_matches('/');
        CgroupPath(format!("{base}/{POD_PREFIX}{sandbox_id}"))
    }

    /// The path without its leading `/`, to join to a mount point.
    pub fn relative(&self) -> &str {
        self.0.trim_start_matches('/')
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_parents_are_accepted_and_the_pod_cgroup_goes_below() {
        let uid = "6a4c1b8e-2f0d-4d4f-9b1e-0c2d3e4f5a6b";
        let p = CgroupPath::parent(&format!("/kubepods/burstable/pod{uid}"))
            .unwrap()
            .unwrap();
        let id = "ab".repeat(32);
        assert_eq!(
            p.pod(&id).as_str(),
            format!("/kubepods/burstable/pod{uid}/vmcri-{id}")
        );
        assert_eq!(
            p.pod(&id).relative(),
            format!("kubepods/burstable/pod{uid}/vmcri-{id}")
        );
        // The root and a crictl-style default.
        let root = CgroupPath::parse("/").unwrap();
        assert_eq!(root.pod("x").as_str(), "/vmcri-x");
        assert_eq!(
            CgroupPath::parse("/vmcri").unwrap().pod("x").as_str(),
            "/vmcri/vmcri-x"
        );
        // Empty: the caller's default.
        assert_eq!(CgroupPath::parent("").unwrap(), None);
    }

    #[test]
    fn hostile_or_foreign_parents_are_refused() {
        let refused = |p: &str| matches!(CgroupPath::parent(p), Err(CgroupError::InvalidPath(_)));
        for p in [
            "relative/path",
            "/kubepods/../../etc",
            "/..",
            "/a/./b",
            "//a",
            "/a/",
            "/a//b",
            "/a\nb",
            "/a b",
            "/a/b\0",
            "/ünï",
            "/a/$(reboot)",
        ] {
            assert!(refused(p), "{p:?} was accepted");
        }
        assert!(refused(&format!("/{}", "a".repeat(MAX_PARENT_LEN))));
        assert!(!refused(&format!("/{}", "a".repeat(MAX_PARENT_LEN - 1))));
        // kubelet's systemd driver: refused, saying why.
        let err = CgroupPath::parent("kubepods-burstable-pod1234.slice").unwrap_err();
        assert!(err.to_string().contains("cgroupfs"), "{err}");
        let err = CgroupPath::parent("system.slice:vmcri:pod").unwrap_err();
        assert!(err.to_string().contains("systemd"), "{err}");
    }
}
