//! State-based CRDTs (convergent replicated data types): replicas change their own state without
//! coordination and exchange whole states; [`merge`](GCounter::merge) is commutative, associative
//! and idempotent, so every replica that has seen the same updates — in any order, any number of
//! times — holds the same value. Keel counts likes with a [`PnCounter`] per product: each node owns
//! one component, and a read merges them.
//!
//! The crate knows nothing of likes or products: replicas are named by any ordered type.

use std::collections::{BTreeMap, BTreeSet};

/// A grow-only counter: one monotonic count per replica; the value is their sum; merge takes the
/// larger count per replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GCounter<R: Ord> {
    counts: BTreeMap<R, u64>,
}

impl<R: Ord> Default for GCounter<R> {
    fn default() -> Self {
        GCounter { counts: BTreeMap::new() }
    }
}

impl<R: Ord + Clone> GCounter<R> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to `replica`'s own count. Only `replica` itself may do this.
    pub fn increment(&mut self, replica: &R, by: u64) {
        let count = self.counts.entry(replica.clone()).or_default();
        *count = count.saturating_add(by);
    }

    pub fn value(&self) -> u64 {
        self.counts.values().fold(0u64, |sum, c| sum.saturating_add(*c))
    }

    /// One replica's count (what it stores and sends).
    pub fn count(&self, replica: &R) -> u64 {
        self.counts.get(replica).copied().unwrap_or(0)
    }

    pub fn merge(&mut self, other: &GCounter<R>) {
        for (replica, count) in &other.counts {
            let mine = self.counts.entry(replica.clone()).or_default();
            *mine = (*mine).max(*count);
        }
    }

    /// Builds a counter from stored components, e.g. rows of `(replica, count)`.
    pub fn from_counts(counts: impl IntoIterator<Item = (R, u64)>) -> Self {
        let mut counter = GCounter::new();
        for (replica, count) in counts {
            counter.merge(&GCounter { counts: BTreeMap::from([(replica, count)]) });
        }
        counter
    }
}

/// A counter that goes up and down: two grow-only counters, increments and decrements; the value is
/// their difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PnCounter<R: Ord> {
    increments: GCounter<R>,
    decrements: GCounter<R>,
}

impl<R: Ord> Default for PnCounter<R> {
    fn default() -> Self {
        PnCounter { increments: GCounter::default(), decrements: GCounter::default() }
    }
}

impl<R: Ord + Clone> PnCounter<R> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn increment(&mut self, replica: &R, by: u64) {
        self.increments.increment(replica, by);
    }

    pub fn decrement(&mut self, replica: &R, by: u64) {
        self.decrements.increment(replica, by);
    }

    pub fn value(&self) -> i64 {
        self.increments.value() as i64 - self.decrements.value() as i64
    }

    /// One replica's component: `(increments, decrements)`.
    pub fn component(&self, replica: &R) -> (u64, u64) {
        (self.increments.count(replica), self.decrements.count(replica))
    }

    pub fn merge(&mut self, other: &PnCounter<R>) {
        self.increments.merge(&other.increments);
        self.decrements.merge(&other.decrements);
    }

    /// Builds a counter from stored components `(replica, increments, decrements)`.
    pub fn from_components(components: impl IntoIterator<Item = (R, u64, u64)>) -> Self {
        let mut counter = PnCounter::new();
        for (replica, up, down) in components {
            let mut one = PnCounter::new();
            one.increment(&replica, up);
            one.decrement(&replica, down);
            counter.merge(&one);
        }
        counter
    }
}

/// A unique tag of one add: the replica and its own sequence number.
type Dot<R> = (R, u64);

/// An observed-remove set: an element is in the set when some add of it has not been removed. A
/// remove takes away only the adds its replica has seen, so an add concurrent with a remove wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrSet<T: Ord, R: Ord> {
    adds: BTreeMap<T, BTreeSet<Dot<R>>>,
    removed: BTreeSet<Dot<R>>,
    /// The last sequence number each replica used.
    clock: BTreeMap<R, u64>,
}

impl<T: Ord, R: Ord> Default for OrSet<T, R> {
    fn default() -> Self {
        OrSet { adds: BTreeMap::new(), removed: BTreeSet::new(), clock: BTreeMap::new() }
    }
}

impl<T: Ord + Clone, R: Ord + Clone> OrSet<T, R> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, replica: &R, element: T) {
        let sequence = self.clock.entry(replica.clone()).or_default();
        *sequence += 1;
        self.adds.entry(element).or_default().insert((replica.clone(), *sequence));
    }

    /// Removes the adds of `element` this replica has seen.
    pub fn remove(&mut self, element: &T) {
        if let Some(dots) = self.adds.get(element) {
            self.removed.extend(dots.iter().cloned());
        }
    }

    pub fn contains(&self, element: &T) -> bool {
        self.adds.get(element).is_some_and(|dots| dots.iter().any(|dot| !self.removed.contains(dot)))
    }

    pub fn elements(&self) -> Vec<T> {
        self.adds.keys().filter(|e| self.contains(e)).cloned().collect()
    }

    pub fn merge(&mut self, other: &OrSet<T, R>) {
        for (element, dots) in &other.adds {
            self.adds.entry(element.clone()).or_default().extend(dots.iter().cloned());
        }
        self.removed.extend(other.removed.iter().cloned());
        for (replica, sequence) in &other.clock {
            let mine = self.clock.entry(replica.clone()).or_default();
            *mine = (*mine).max(*sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count() {
        let (a, b) = ("a".to_owned(), "b".to_owned());
        let mut x = PnCounter::new();
        x.increment(&a, 5);
        x.decrement(&a, 2);
        let mut y = PnCounter::new();
        y.increment(&b, 1);
        x.merge(&y);
        assert_eq!(x.value(), 4);
        assert_eq!(x.component(&a), (5, 2));
        let rebuilt = PnCounter::from_components([(a.clone(), 5, 2), (b.clone(), 1, 0), (a, 3, 1)]);
        assert_eq!(rebuilt.value(), 4, "an older component of a replica never lowers it");
    }

    #[test]
    fn a_concurrent_add_wins_over_a_remove() {
        let (a, b) = (1u8, 2u8);
        let mut x: OrSet<&str, u8> = OrSet::new();
        x.add(&a, "like");
        let mut y = x.clone();
        y.remove(&"like");
        x.add(&a, "like"); // concurrently, x adds again
        y.merge(&x);
        assert!(y.contains(&"like"));
        let mut z: OrSet<&str, u8> = OrSet::new();
        z.add(&b, "other");
        z.remove(&"other");
        assert!(!z.contains(&"other"));
        assert!(z.elements().is_empty());
    }
}
