//! The rate limit on the log lines of logged packets: a token bucket, so a flood of
//! packets that a `log = true` rule decides cannot fill the disk. The event stream keeps
//! every event; only the log lines are limited, and the ones left out are summed up.

use std::time::{Duration, Instant};

/// Log lines for logged packets allowed in a burst.
pub const LOG_BURST: f64 = 20.0;
/// Log lines for logged packets allowed per second after a burst.
pub const LOG_PER_SEC: f64 = 10.0;
/// How often suppressed log lines are summed up in one line.
pub const SUPPRESSED_REPORT: Duration = Duration::from_secs(5);

/// Token bucket for the log lines of logged packets.
pub struct LogLimiter {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    reported: Instant,
}

impl LogLimiter {
    /// A full bucket: the first [`LOG_BURST`] lines pass at once.
    pub fn new() -> LogLimiter {
        LogLimiter {
            tokens: LOG_BURST,
            refilled: Instant::now(),
            suppressed: 0,
            reported: Instant::now(),
        }
    }

    /// Whether one more line may be written now.
    pub fn admit(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * LOG_PER_SEC;
        self.tokens = (self.tokens + earned).min(LOG_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Lines suppressed since the last report, when it is time to report them.
    pub fn take_report(&mut self) -> Option<u64> {
        if self.suppressed == 0 || self.reported.elapsed() < SUPPRESSED_REPORT {
            return None;
        }
        self.reported = Instant::now();
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for LogLimiter {
    fn default() -> LogLimiter {
        LogLimiter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limiter_admits_a_burst_then_counts_what_it_suppresses() {
        let mut limiter = LogLimiter::new();
        let admitted = (0..1000).filter(|_| limiter.admit()).count();
        assert!(
            (LOG_BURST as usize..=LOG_BURST as usize + 2).contains(&admitted),
            "admitted {admitted}"
        );
        assert_eq!(limiter.suppressed as usize, 1000 - admitted);
        limiter.reported -= SUPPRESSED_REPORT;
        assert_eq!(limiter.take_report(), Some(1000 - admitted as u64));
        assert_eq!(limiter.take_report(), None);
    }
}
