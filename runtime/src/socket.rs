//! The CRI socket, created 0600 with no moment in which another user
//! could connect: it is bound in a fresh 0700 directory beside its final
//! path, chmodded, then renamed into place. Its permissions do not depend
//! on the umask.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Binds a Unix listener at `path` (replacing a stale socket there),
/// mode 0600, owned by the daemon's user.
pub fn bind_private(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let staging = parent.join(format!(
        ".{}.{}.bind",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover from a killed daemon with this PID.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let tmp = staging.join("s");
        let listener = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn the_socket_is_0600_and_replaces_a_stale_one() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("vmcri.sock");
        std::fs::write(&path, "stale").unwrap();
        // With the usual umask (022) a bound socket is 0755: only the
        // explicit mode makes it 0600. (Changing the umask here would
        // race the other tests of this process.)
        let _l = bind_private(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        tokio::net::UnixStream::connect(&path).await.unwrap();
        // Only the socket is left beside it.
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }
}
