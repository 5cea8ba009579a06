//! The budget for buffered request bodies (`server.max_buffered_bytes`): every body lfguard
//! buffers, on verified and pass-through routes alike, holds a share of one process-wide byte
//! count until its request is finished with. Past the budget a request is refused with 503
//! `overloaded` instead of growing the process until it is OOM-killed.

use std::sync::atomic::{AtomicU64, Ordering};

/// The shared count of bytes held by buffered bodies, and its limit.
#[derive(Debug)]
pub struct BodyBudget {
    limit: u64,
    held: AtomicU64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Self {
        BodyBudget {
            limit,
            held: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently held by reservations.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// An empty reservation; `grow` adds to it, dropping it gives everything back.
    pub fn reservation(&self) -> Reservation<'_> {
        Reservation {
            budget: self,
            bytes: 0,
        }
    }

    fn take(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }
}

/// A share of the budget, given back when dropped: whichever way the request ends (answered,
/// refused, timed out, or dropped because the client went away).
#[derive(Debug)]
pub struct Reservation<'b> {
    budget: &'b BodyBudget,
    bytes: u64,
}

/// The budget is spent: the request must be refused (`Rejection::Overloaded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

impl Reservation<'_> {
    /// Adds `bytes` to the reservation, or leaves it unchanged if the budget cannot cover them.
    pub fn grow(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        if self.budget.take(bytes) {
            self.bytes += bytes;
            Ok(())
        } else {
            Err(OverBudget)
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_limit_and_give_it_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut first = budget.reservation();
        first.grow(60).unwrap();
        let mut second = budget.reservation();
        assert_eq!(second.grow(41), Err(OverBudget));
        assert_eq!(second.bytes(), 0, "a refused grow takes nothing");
        second.grow(40).unwrap();
        assert_eq!(budget.held(), 100);
        assert_eq!(second.grow(1), Err(OverBudget));
        second.grow(0).unwrap();
        drop(first);
        assert_eq!(budget.held(), 40);
        second.grow(60).unwrap();
        drop(second);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.reservation().grow(u64::MAX), Err(OverBudget));
        assert_eq!(budget.held(), 0);
    }
}
