//! vmcri's agent API: the generated protobuf types and tonic client and
//! server for `vmcri.agent.v1`.

/// The agent API, version 1.
pub mod agent {
    /// Version 1 of the API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("vmcri.agent.v1");
    }
}

/// Major version of the agent API this crate speaks.
pub const AGENT_API_VERSION: u32 = 1;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The current time in nanoseconds since the Unix epoch: the unit of every
/// `*_ns` timestamp in the agent API. 0 for a clock set before 1970;
/// saturates at `i64::MAX` (in the year 2262).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_ns_is_nanoseconds_since_the_epoch() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let now = now_ns();
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(i128::from(now) >= i128::try_from(before.as_nanos()).unwrap());
        assert!(i128::from(now) <= i128::try_from(after.as_nanos()).unwrap());
        // Nanoseconds, not micro- or milliseconds: past 2020-01-01.
        assert!(now > 1_577_836_800 * 1_000_000_000);
    }
}
