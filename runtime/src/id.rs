//! IDs the daemon hands out: sandboxes, containers, exec sessions.

/// Nanoseconds since the Unix epoch (the agent API's unit of time).
pub use vmcri_proto::now_ns;

/// A fresh ID of 64 hex digits (256 random bits).
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // getrandom(2) does not fail for 32 bytes once the pool is up;
        // fall back to time and PID rather than refusing the pod.
        let seed = u128::from(now_ns().unsigned_abs()) ^ (u128::from(std::process::id()) << 64);
        b[..16].copy_from_slice(&seed.to_le_bytes());
    }
    hex::encode(b)
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
