//! Warnings a guest (or the far side of the tap) can trigger at will,
//! held to one a second per kind, each with the count of those held back.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Shortest time between two warnings of one kind.
const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of warning and its rate limit.
#[derive(Debug)]
pub struct RateLimitedWarn {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    /// A limiter for warnings that say `what`.
    pub const fn new(what: &'static str) -> Self {
        RateLimitedWarn {
            what,
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `what` with `detail` unless one was logged less than a second
    /// ago; returns whether it logged.
    pub fn warn(&mut self, detail: &dyn Display) -> bool {
        self.warn_at(Instant::now(), detail)
    }

    fn warn_at(&mut self, now: Instant, detail: &dyn Display) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < INTERVAL)
        {
            self.suppressed = self.suppressed.saturating_add(1);
            return false;
        }
        tracing::warn!(
            suppressed_since_last = self.suppressed,
            "virtio-net: {}: {detail}",
            self.what
        );
        self.last = Some(now);
        self.suppressed = 0;
        true
    }

    /// Warnings held back since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_warning_a_second_with_a_count_of_the_rest() {
        let mut w = RateLimitedWarn::new("test");
        let t0 = Instant::now();
        assert!(w.warn_at(t0, &"first"));
        for i in 0..1000u32 {
            assert!(!w.warn_at(t0 + Duration::from_millis(u64::from(i % 999)), &i));
        }
        assert_eq!(w.suppressed(), 1000);
        assert!(w.warn_at(t0 + INTERVAL, &"next"));
        assert_eq!(w.suppressed(), 0);
    }
}
