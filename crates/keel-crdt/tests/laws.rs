//! The merge laws, checked on random states, and convergence of replicas that receive each other's
//! states in any order, any number of times.

use keel_crdt::{GCounter, OrSet, PnCounter};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Up(u8, u64),
    Down(u8, u64),
    Add(u8, u8),
    Remove(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 0u64..100).prop_map(|(r, n)| Op::Up(r, n)),
        (0u8..3, 0u64..100).prop_map(|(r, n)| Op::Down(r, n)),
        (0u8..3, 0u8..5).prop_map(|(r, e)| Op::Add(r, e)),
        (0u8..3, 0u8..5).prop_map(|(r, e)| Op::Remove(r, e)),
    ]
}

/// Replica states after applying each op at the replica it names.
#[derive(Debug, Clone, Default, PartialEq)]
struct State {
    g: GCounter<u8>,
    pn: PnCounter<u8>,
    set: OrSet<u8, u8>,
}

impl State {
    fn merge(&mut self, other: &State) {
        self.g.merge(&other.g);
        self.pn.merge(&other.pn);
        self.set.merge(&other.set);
    }
}

fn replicas(ops: &[Op]) -> Vec<State> {
    let mut states = vec![State::default(); 3];
    for op in ops {
        match *op {
            Op::Up(r, n) => {
                states[r as usize].g.increment(&r, n);
                states[r as usize].pn.increment(&r, n);
            }
            Op::Down(r, n) => states[r as usize].pn.decrement(&r, n),
            Op::Add(r, e) => states[r as usize].set.add(&r, e),
            Op::Remove(r, e) => states[r as usize].set.remove(&e),
        }
    }
    states
}

fn merged(a: &State, b: &State) -> State {
    let mut m = a.clone();
    m.merge(b);
    m
}

proptest! {
    #[test]
    fn merge_is_commutative_associative_and_idempotent(
        x in prop::collection::vec(op(), 0..40),
        y in prop::collection::vec(op(), 0..40),
        z in prop::collection::vec(op(), 0..40),
    ) {
        // Three independent histories, each spread over the three replicas, then folded into one state.
        let fold = |ops: &[Op]| replicas(ops).iter().fold(State::default(), |acc, s| merged(&acc, s));
        let (a, b, c) = (fold(&x), fold(&y), fold(&z));
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        prop_assert_eq!(merged(&a, &a), a.clone());
    }

    #[test]
    fn replicas_converge_under_any_delivery_order_and_duplication(
        ops in prop::collection::vec(op(), 0..60),
        deliveries in prop::collection::vec((0usize..3, 0usize..3), 0..30),
    ) {
        let mut states = replicas(&ops);
        let snapshot = states.clone();
        // Arbitrary gossip, with repeats and in any order...
        for (from, to) in deliveries {
            let sent = states[from].clone();
            states[to].merge(&sent);
        }
        // ...then everyone eventually hears from everyone (in a rotated order per replica).
        for (to, state) in states.iter_mut().enumerate() {
            for k in 0..3 {
                state.merge(&snapshot[(to + k) % 3]);
            }
        }
        prop_assert_eq!(&states[0], &states[1]);
        prop_assert_eq!(&states[1], &states[2]);
        // The counters are the sums of what happened.
        let ups: u64 = ops.iter().map(|o| if let Op::Up(_, n) = o { *n } else { 0 }).sum();
        let downs: u64 = ops.iter().map(|o| if let Op::Down(_, n) = o { *n } else { 0 }).sum();
        prop_assert_eq!(states[0].g.value(), ups);
        prop_assert_eq!(states[0].pn.value(), ups as i64 - downs as i64);
    }
}
