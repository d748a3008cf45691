//! A per-object work queue, as client-go's and kube-runtime's: a controller reconciles the
//! objects whose names wait here, one at a time, instead of re-listing every object on each
//! change. A name waits at most once (added again while it waits, it keeps its place), is due
//! now or at a time (the soonest asked for wins), and a name whose reconcile failed comes back
//! after a backoff that doubles with each failure in a row.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// The first retry after a failure; each failure in a row doubles it, up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct WorkQueue {
    /// Due now, in the order they came.
    ready: VecDeque<String>,
    in_ready: HashSet<String>,
    /// Due later, soonest first; `due` holds each one's time.
    delayed: BTreeSet<(Instant, String)>,
    due: HashMap<String, Instant>,
    /// Failures in a row, by name.
    failures: HashMap<String, u32>,
}

impl WorkQueue {
    /// `name` is due now.
    pub fn add(&mut self, name: &str) {
        if let Some(at) = self.due.remove(name) {
            self.delayed.remove(&(at, name.to_string()));
        }
        if self.in_ready.insert(name.to_string()) {
            self.ready.push_back(name.to_string());
        }
    }

    /// `name` is due at `at`, unless it is due sooner already.
    pub fn add_at(&mut self, name: &str, at: Instant) {
        if self.in_ready.contains(name) {
            return;
        }
        match self.due.get(name) {
            Some(&sooner) if sooner <= at => {}
            Some(&later) => {
                self.delayed.remove(&(later, name.to_string()));
                self.delayed.insert((at, name.to_string()));
                self.due.insert(name.to_string(), at);
            }
            None => {
                self.delayed.insert((at, name.to_string()));
                self.due.insert(name.to_string(), at);
            }
        }
    }

    /// The next name due at `now`, if any: those whose time came first, in time order.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        while let Some((at, _)) = self.delayed.first() {
            if *at > now {
                break;
            }
            let (_, name) = self.delayed.pop_first()?;
            self.due.remove(&name);
            if self.in_ready.insert(name.clone()) {
                self.ready.push_back(name);
            }
        }
        let name = self.ready.pop_front()?;
        self.in_ready.remove(&name);
        Some(name)
    }

    /// When the soonest delayed name falls due (`None`: nothing waits for a time).
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.first().map(|(at, _)| *at)
    }

    /// `name`'s reconcile failed at `now`: it comes back after its backoff, which this returns.
    pub fn failed(&mut self, name: &str, now: Instant) -> Duration {
        let failures = self.failures.entry(name.to_string()).or_insert(0);
        let backoff = BASE_BACKOFF
            .saturating_mul(1u32.checked_shl(*failures).unwrap_or(u32::MAX))
            .min(MAX_BACKOFF);
        *failures = failures.saturating_add(1);
        self.add_at(name, now + backoff);
        backoff
    }

    /// `name`'s reconcile succeeded: its next failure starts the backoff afresh.
    pub fn succeeded(&mut self, name: &str) {
        self.failures.remove(name);
    }

    /// `name` is gone: it no longer waits, and its failures are forgotten.
    pub fn forget(&mut self, name: &str) {
        if self.in_ready.remove(name) {
            self.ready.retain(|n| n != name);
        }
        if let Some(at) = self.due.remove(name) {
            self.delayed.remove(&(at, name.to_string()));
        }
        self.failures.remove(name);
    }

    /// How many names wait, now or for a time.
    pub fn len(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut WorkQueue, now: Instant) -> Vec<String> {
        std::iter::from_fn(|| q.pop(now)).collect()
    }

    #[test]
    fn a_name_added_again_while_it_waits_keeps_its_place() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        for name in ["a", "b", "a", "c", "b"] {
            q.add(name);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(drain(&mut q, now), ["a", "b", "c"]);
        assert!(q.is_empty());
    }

    #[test]
    fn the_soonest_time_wins_and_a_name_due_now_is_not_delayed() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        let s = Duration::from_secs;
        q.add_at("late", now + s(10));
        q.add_at("late", now + s(2));
        q.add_at("late", now + s(5));
        assert_eq!(q.next_due(), Some(now + s(2)));
        q.add("now");
        q.add_at("now", now + s(1));
        assert_eq!(drain(&mut q, now), ["now"]);
        assert_eq!(q.pop(now + s(1)), None);
        assert_eq!(drain(&mut q, now + s(2)), ["late"]);
        assert_eq!(q.next_due(), None);
        // Added now while it waits for a time: due now, once.
        q.add_at("x", now + s(3));
        q.add("x");
        assert_eq!(drain(&mut q, now + s(4)), ["x"]);
    }

    #[test]
    fn names_whose_time_came_go_in_time_order_after_those_already_due() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        let ms = Duration::from_millis;
        q.add_at("second", now + ms(20));
        q.add_at("first", now + ms(10));
        q.add("ready");
        assert_eq!(drain(&mut q, now + ms(30)), ["ready", "first", "second"]);
    }

    #[test]
    fn failures_back_off_doubling_to_a_ceiling_and_success_resets_them() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        let backoffs: Vec<Duration> = (0..10)
            .map(|_| {
                let b = q.failed("a", now);
                assert_eq!(q.pop(now + b), Some("a".to_string()));
                b
            })
            .collect();
        assert_eq!(backoffs[0], BASE_BACKOFF);
        assert_eq!(backoffs[1], BASE_BACKOFF * 2);
        assert_eq!(backoffs[3], BASE_BACKOFF * 8);
        assert_eq!(backoffs[9], MAX_BACKOFF);
        assert_eq!(q.pop(now), None, "not due before its backoff");
        q.succeeded("a");
        assert_eq!(q.failed("a", now), BASE_BACKOFF);
        // Many failures never overflow.
        for _ in 0..100 {
            q.failed("b", now);
        }
        assert_eq!(q.failed("b", now), MAX_BACKOFF);
    }

    #[test]
    fn a_forgotten_name_waits_no_more() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        q.add("a");
        q.add("b");
        q.add_at("c", now);
        q.forget("a");
        q.forget("c");
        assert_eq!(drain(&mut q, now), ["b"]);
        assert!(q.is_empty());
    }
}
