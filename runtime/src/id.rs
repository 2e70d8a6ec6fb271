//! IDs the daemon hands out: sandboxes, containers, exec sessions.

/// A fresh ID of 64 hex digits (256 random bits).
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    // SAFETY: b is valid for writes of b.len() bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(b.len()) {
        // getrandom(2) does not fail for 32 bytes once the pool is up;
        // fall back to time and PID rather than refusing the pod.
        let seed = u128::from(now_ns().unsigned_abs()) ^ (u128::from(std::process::id()) << 64);
        b[..16].copy_from_slice(&seed.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_64_hex_digits_and_differ() {
        let (a, b) = (super::new_id(), super::new_id());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
