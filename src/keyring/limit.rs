//! A per-root budget for the unwraps that Decrypt asks of a root.
//!
//! Every wrapped key a caller sends that is not cached costs a root call: an HSM operation,
//! or a paid cloud KMS request. Whoever can reach the socket could otherwise send endless
//! random annotations. The budget is a token bucket (as GCRA: one "theoretical arrival
//! time"): `burst` calls at once, then `per_second`. A caller whose turn is due within
//! [`MAX_WAIT`] waits for it; anyone later is refused at once without taking a turn, so a
//! flood costs at most `burst + per_second * seconds` root calls.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Longest a Decrypt waits for its turn (well inside kube-apiserver's 3 s deadline).
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// The budget of one root.
pub struct UnwrapBudget {
    interval: Duration,
    /// How far ahead of now the schedule may run: (burst - 1) intervals.
    slack: Duration,
    /// When the next call would be due if calls came at exactly the allowed rate.
    next: Mutex<Option<Instant>>,
}

impl UnwrapBudget {
    /// `per_second` calls per second after an initial `burst` (both at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_second.max(1);
        Self {
            interval,
            slack: interval * (burst.max(1) - 1),
            next: Mutex::new(None),
        }
    }

    /// Takes a turn: returns when it is due, or `false` at once when that would be later
    /// than [`MAX_WAIT`] from now.
    pub async fn take(&self) -> bool {
        let due = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let scheduled = next.map_or(now, |at| at.max(now));
            // The earliest moment this call may run without exceeding the burst.
            let due = scheduled.checked_sub(self.slack).unwrap_or(now).max(now);
            if due > now + MAX_WAIT {
                return false;
            }
            *next = Some(scheduled + self.interval);
            due
        };
        // Only a turn in the future goes through the timer: tokio completes even a sleep
        // until now on its next tick, up to a millisecond later.
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate_then_refusal() {
        let budget = UnwrapBudget::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(budget.take().await);
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst does not wait");
        // The next ten turns are spaced 100 ms apart, all within MAX_WAIT of their ask.
        for _ in 0..10 {
            assert!(budget.take().await);
        }
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
    }

    /// A turn that is due now must not go through the timer: tokio fires even a zero-length
    /// sleep only on its next millisecond tick, which made every cache miss ~1 ms slower
    /// than its root call (seen by `cargo bench --bench cold`).
    #[tokio::test]
    async fn a_turn_within_the_burst_is_granted_without_waiting_for_the_timer() {
        let budget = UnwrapBudget::new(10, 3);
        for turn in 0..3 {
            let mut take = std::pin::pin!(budget.take());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                matches!(take.as_mut().poll(&mut cx), std::task::Poll::Ready(true)),
                "turn {turn} of the burst waited"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_beyond_the_wait_are_refused_without_taking_a_turn() {
        let budget = std::sync::Arc::new(UnwrapBudget::new(10, 2));
        let mut granted = 0;
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let budget = budget.clone();
            tasks.push(tokio::spawn(async move { budget.take().await }));
        }
        for t in tasks {
            granted += usize::from(t.await.expect("join"));
        }
        // 2 at once plus 10 per second of MAX_WAIT (the turn at exactly +1 s included).
        assert_eq!(granted, 2 + 10);
        // Refusals took no turn: after the queue drains, a new caller is served promptly.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = Instant::now();
        assert!(budget.take().await);
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
