//! Evening out the users per shard (`POST /v1/admin/shards/rebalance`, `keel shards rebalance`):
//! count the users of each bucket on every shard, plan which buckets go where ([`plan`], a pure
//! function of those counts), and ask for the moves ([`rebalance`]). The moves themselves are
//! ordinary bucket moves ([`crate::db::moves`]), carried out by whichever process drives them.

use std::collections::{BTreeMap, BTreeSet};

use keel_shard::ShardId;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::moves::{self, MoveState, StartError};
use crate::db::{ConnectError, Databases, Sql};

/// Per shard, the users of each bucket it holds (every bucket it holds, those with no user at 0).
pub type Loads = BTreeMap<ShardId, BTreeMap<u16, i64>>;

/// One move of a plan: buckets, from whichever shards hold them, to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    pub to: ShardId,
    pub buckets: Vec<u16>,
    /// Users in those buckets when they were counted.
    pub users: i64,
}

/// What [`plan`] decides, and the users per shard before and after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub moves: Vec<PlannedMove>,
    pub before: BTreeMap<ShardId, i64>,
    pub after: BTreeMap<ShardId, i64>,
}

/// A bound on the planner's steps. Each step lowers the spread of the loads, so the plan ends on
/// its own; the bound only keeps a request from spinning on a case no one foresaw. A bucket moves
/// at most a few times in any plan seen, and there are [`keel_shard::BUCKETS`] of them.
const MAX_STEPS: usize = 4 * keel_shard::BUCKETS as usize;

/// Plans moves that even out the users per shard.
///
/// Greedy: while a shard above the mean holds a bucket whose move to a shard below the mean brings
/// *both* closer to it, that bucket moves. Buckets whose users fit within both shards' distance to
/// the mean are preferred, the fullest first (fewer buckets move, and neither shard overshoots);
/// failing that, the emptiest that still helps. With no users at all, every bucket weighs the same,
/// so bucket counts are evened out instead: a new, empty shard still gets its share, and the users
/// who sign up later spread over it too.
///
/// Every step lowers the sum of the squared distances to the mean (a bucket of weight `w` from a
/// shard at `s` to one at `d` lowers it when `w < s - d`, which both getting closer implies), so the
/// loop ends. A bucket that moved more than once in the plan moves once, from its shard now to its
/// last; one back where it started does not move. One move per target shard: a move may take
/// buckets from several shards.
pub fn plan(loads: &Loads) -> Plan {
    let before: BTreeMap<ShardId, i64> =
        loads.iter().map(|(shard, buckets)| (*shard, buckets.values().sum())).collect();
    let users_total: i64 = before.values().sum();
    // Buckets with no user weigh nothing: moving one changes no shard's users, so it never helps.
    let weigh = |users: i64| if users_total > 0 { users } else { 1 };
    let shards = loads.len() as i64;
    let mut owner: BTreeMap<u16, ShardId> = BTreeMap::new();
    // Per shard, its buckets by (weight, bucket), to find the one of a weight at once.
    let mut held: BTreeMap<ShardId, BTreeSet<(i64, u16)>> = BTreeMap::new();
    let mut load: BTreeMap<ShardId, i64> = BTreeMap::new();
    for (shard, buckets) in loads {
        let mine = held.entry(*shard).or_default();
        for (bucket, users) in buckets {
            owner.insert(*bucket, *shard);
            mine.insert((weigh(*users), *bucket));
        }
        load.insert(*shard, mine.iter().map(|(w, _)| w).sum());
    }
    let total: i64 = load.values().sum();
    let mut current = owner.clone();
    // Distances to the mean are kept in whole numbers, multiplied by the number of shards: a
    // shard's is `load × shards − total`.
    for _ in 0..MAX_STEPS {
        let mut above: Vec<(i64, ShardId)> =
            load.iter().map(|(s, l)| (l * shards - total, *s)).filter(|(excess, _)| *excess > 0).collect();
        let mut below: Vec<(i64, ShardId)> =
            load.iter().map(|(s, l)| (total - l * shards, *s)).filter(|(deficit, _)| *deficit > 0).collect();
        // The furthest from the mean first; equal ones by shard number, so a plan is repeatable.
        above.sort_by_key(|(excess, s)| (std::cmp::Reverse(*excess), *s));
        below.sort_by_key(|(deficit, s)| (std::cmp::Reverse(*deficit), *s));
        let step = above.iter().find_map(|(excess, from)| {
            below.iter().find_map(|(deficit, to)| {
                let gap = (*excess).min(*deficit);
                pick(&held[from], gap, shards).map(|(weight, bucket)| (*from, *to, weight, bucket))
            })
        });
        let Some((from, to, weight, bucket)) = step else { break };
        held.get_mut(&from).expect("a shard of the plan").remove(&(weight, bucket));
        held.get_mut(&to).expect("a shard of the plan").insert((weight, bucket));
        *load.get_mut(&from).expect("a shard of the plan") -= weight;
        *load.get_mut(&to).expect("a shard of the plan") += weight;
        current.insert(bucket, to);
    }
    let users_of = |bucket: u16| loads[&owner[&bucket]][&bucket];
    let mut by_target: BTreeMap<ShardId, Vec<u16>> = BTreeMap::new();
    let mut after = before.clone();
    for (bucket, to) in &current {
        let from = owner[bucket];
        if from != *to {
            by_target.entry(*to).or_default().push(*bucket);
            *after.get_mut(&from).expect("a shard of the plan") -= users_of(*bucket);
            *after.get_mut(to).expect("a shard of the plan") += users_of(*bucket);
        }
    }
    let moves = by_target
        .into_iter()
        .map(|(to, buckets)| PlannedMove { to, users: buckets.iter().map(|b| users_of(*b)).sum(), buckets })
        .collect();
    Plan { moves, before, after }
}

/// The bucket of `held` to move across a `gap` (the smaller of the two shards' distances to the
/// mean, both multiplied by `shards`): the heaviest that fits within it, else the lightest that
/// still brings both shards closer (weight × shards < 2 × gap). None if no bucket helps.
fn pick(held: &BTreeSet<(i64, u16)>, gap: i64, shards: i64) -> Option<(i64, u16)> {
    let fits = held.range(..=(gap / shards, u16::MAX)).next_back().filter(|(weight, _)| *weight > 0);
    let helps = || held.range((1, 0)..).next().filter(|(weight, _)| weight * shards < 2 * gap);
    fits.or_else(helps).copied()
}

/// What a rebalance did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rebalance {
    pub moves: Vec<RebalanceMove>,
    /// Users per shard when they were counted, by shard number.
    #[schema(value_type = BTreeMap<String, i64>)]
    pub users_per_shard_before: BTreeMap<ShardId, i64>,
    /// Users per shard once the moves are done, if no one signs up or leaves meanwhile.
    #[schema(value_type = BTreeMap<String, i64>)]
    pub users_per_shard_after: BTreeMap<ShardId, i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RebalanceMove {
    /// The move's id (`GET /v1/admin/shards/moves/{id}`); absent in a dry run.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub id: Option<Uuid>,
    /// The buckets it moves, from whichever shards hold them.
    pub buckets: Vec<u16>,
    /// The shard they move to.
    pub to: u16,
    /// Users in those buckets when they were counted.
    pub users: i64,
}

/// Why a rebalance was refused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    /// A move is not finished: its buckets' users are counted on a shard they are leaving, and the
    /// plan would be made from a map about to change.
    #[error("{0}")]
    Busy(String),
    /// A shard did not say how many users it has: no plan without every shard's count.
    #[error("{0}")]
    ShardDown(String),
    /// A move of the plan was refused; `started` are those asked for before it, which go on.
    #[error("{}", started_then(.started, .source))]
    Start { started: Vec<Uuid>, source: StartError },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

fn started_then(started: &[Uuid], error: &StartError) -> String {
    if started.is_empty() {
        return error.to_string();
    }
    let ids: Vec<String> = started.iter().map(Uuid::to_string).collect();
    format!("{error} (moves {} of the plan were started before, and go on)", ids.join(", "))
}

/// Plans a rebalance from the users on every shard now and, unless `dry_run`, asks for its moves.
/// Refused while any move is unfinished.
pub async fn rebalance(db: &Databases, dry_run: bool) -> Result<Rebalance, RebalanceError> {
    if let Some(unfinished) = moves::recent(db, 1).await?.into_iter().find(|m| !is_finished(m.state)) {
        return Err(RebalanceError::Busy(format!(
            "move {} to shard {} is {}: rebalance once it is done",
            unfinished.id, unfinished.to, unfinished.state
        )));
    }
    // The newest map, not the one this process last heard of: a move may have just switched it.
    db.reload_shard_map().await?;
    let loads = loads(db).await?;
    let planned = plan(&loads);
    let mut started = Vec::new();
    let mut listed = Vec::with_capacity(planned.moves.len());
    for planned in planned.moves {
        let id = if dry_run {
            None
        } else {
            let mv = moves::start(db, &planned.buckets, planned.to)
                .await
                .map_err(|source| RebalanceError::Start { started: started.clone(), source })?;
            started.push(mv.id);
            Some(mv.id)
        };
        listed.push(RebalanceMove { id, buckets: planned.buckets, to: planned.to, users: planned.users });
    }
    if !dry_run && !listed.is_empty() {
        tracing::info!(moves = listed.len(), "rebalance: moves asked for");
    }
    Ok(Rebalance { moves: listed, users_per_shard_before: planned.before, users_per_shard_after: planned.after })
}

fn is_finished(state: MoveState) -> bool {
    matches!(state, MoveState::Done | MoveState::Failed)
}

/// Every shard's users per bucket, asked of all shards at once, for the buckets the map gives it.
async fn loads(db: &Databases) -> Result<Loads, RebalanceError> {
    let set = db.shards();
    let mut loads: Loads = set.all().map(|(shard, _)| (shard, BTreeMap::new())).collect();
    for (bucket, shard) in set.map().assignments() {
        loads.entry(shard).or_default().insert(bucket, 0);
    }
    let counts = set.all().map(|(shard, pool)| async move {
        let counted = async {
            let client = pool.client().await.map_err(ConnectError::from)?;
            let rows = client.rows("SELECT bucket, count(*) FROM users GROUP BY bucket", &[]).await?;
            Ok::<_, ConnectError>(rows.iter().map(|r| (r.get::<_, i16>(0) as u16, r.get::<_, i64>(1))).collect())
        };
        (shard, counted.await)
    });
    let mut down = Vec::new();
    for (shard, counted) in futures_util::future::join_all(counts).await {
        let counted: Vec<(u16, i64)> = match counted {
            Ok(counted) => counted,
            Err(e) => {
                down.push(format!("shard {shard} ({e})"));
                continue;
            }
        };
        let held = loads.get_mut(&shard).expect("every shard has an entry");
        for (bucket, users) in counted {
            // With no move unfinished, a shard holds rows of its own buckets only; any others are
            // not its users to count.
            if let Some(slot) = held.get_mut(&bucket) {
                *slot = users;
            }
        }
    }
    if !down.is_empty() {
        return Err(RebalanceError::ShardDown(format!("cannot count the users of {}", down.join(", "))));
    }
    Ok(loads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shards` shards holding buckets as `b mod holders` (holders ≤ shards: the others are new and
    /// empty), with `users(b)` users in bucket `b`.
    fn loads(shards: u16, holders: u16, users: impl Fn(u16) -> i64) -> Loads {
        let mut loads: Loads = (0..shards).map(|s| (s, BTreeMap::new())).collect();
        for b in 0..keel_shard::BUCKETS {
            loads.get_mut(&(b % holders)).unwrap().insert(b, users(b));
        }
        loads
    }

    /// Applies a plan to `loads`, checking it moves each bucket at most once, to another shard.
    fn apply(loads: &Loads, plan: &Plan) -> Loads {
        let mut after = loads.clone();
        let mut moved = BTreeSet::new();
        for mv in &plan.moves {
            assert!(!mv.buckets.is_empty(), "an empty move: {mv:?}");
            let mut users = 0;
            for b in &mv.buckets {
                assert!(moved.insert(*b), "bucket {b} in two moves");
                let from = *after.iter().find(|(_, held)| held.contains_key(b)).unwrap().0;
                assert_ne!(from, mv.to, "bucket {b} moves to the shard that holds it");
                let count = after.get_mut(&from).unwrap().remove(b).unwrap();
                users += count;
                after.get_mut(&mv.to).unwrap().insert(*b, count);
            }
            assert_eq!(users, mv.users, "{mv:?}");
        }
        let targets: BTreeSet<ShardId> = plan.moves.iter().map(|m| m.to).collect();
        assert_eq!(targets.len(), plan.moves.len(), "one move per target shard");
        after
    }

    fn users(loads: &Loads) -> BTreeMap<ShardId, i64> {
        loads.iter().map(|(s, b)| (*s, b.values().sum())).collect()
    }

    #[test]
    fn a_new_empty_shard_gets_its_share_of_the_users() {
        // Two shards of 600 users each (bucket b has b % 3 users), and a new third one.
        let before = loads(3, 2, |b| i64::from(b % 3));
        let plan = plan(&before);
        let after = apply(&before, &plan);
        assert_eq!(users(&before), plan.before);
        assert_eq!(users(&after), plan.after);
        let total: i64 = plan.after.values().sum();
        let mean = total as f64 / 3.0;
        let heaviest = 2.0;
        for (shard, users) in &plan.after {
            assert!((*users as f64 - mean).abs() <= heaviest, "shard {shard}: {users} users, mean {mean}: {plan:?}");
        }
        assert!(plan.moves.iter().any(|m| m.to == 2), "{plan:?}");
        // Buckets with no user do not move: they change nothing.
        assert!(plan.moves.iter().flat_map(|m| &m.buckets).all(|b| before.values().any(|h| h.get(b) > Some(&0))));
    }

    #[test]
    fn heavy_buckets_fill_the_gap_first() {
        let mut before = loads(2, 1, |_| 1);
        *before.get_mut(&0).unwrap().get_mut(&7).unwrap() = 300;
        let plan = plan(&before);
        // 1323 users: the bucket of 300 moves, then 1-user ones up to the mean.
        assert_eq!(plan.moves.len(), 1);
        assert!(plan.moves[0].buckets.contains(&7), "{plan:?}");
        assert!((plan.after[&0] - plan.after[&1]).abs() <= 1, "{plan:?}");
        assert_eq!(plan.moves[0].buckets.len(), 1 + 361, "{plan:?}");
    }

    #[test]
    fn a_balanced_deployment_needs_no_move() {
        assert_eq!(plan(&loads(2, 2, |_| 3)).moves, vec![]);
        // Within one bucket of the mean: moving any would overshoot as far the other way.
        let mut nearly = loads(2, 2, |_| 1);
        *nearly.get_mut(&0).unwrap().get_mut(&0).unwrap() = 2;
        assert_eq!(plan(&nearly).moves, vec![]);
        assert_eq!(plan(&loads(1, 1, i64::from)).moves, vec![], "one shard");
    }

    #[test]
    fn with_no_users_the_bucket_counts_are_evened_out() {
        let before = loads(3, 2, |_| 0);
        let plan = plan(&before);
        let after = apply(&before, &plan);
        let counts: Vec<usize> = after.values().map(BTreeMap::len).collect();
        assert!(counts.iter().all(|c| (341..=342).contains(c)), "{counts:?}");
        assert_eq!(plan.after, BTreeMap::from([(0, 0), (1, 0), (2, 0)]));
        assert_eq!(plan.moves.len(), 1, "{plan:?}");
        assert_eq!(plan.moves[0].to, 2);
    }

    #[test]
    fn two_new_shards_get_one_move_each_from_several_shards() {
        let before = loads(4, 2, |b| 1 + i64::from(b % 7 == 0));
        let plan = plan(&before);
        let after = apply(&before, &plan);
        let mean = plan.before.values().sum::<i64>() as f64 / 4.0;
        for (shard, users) in users(&after) {
            assert!((users as f64 - mean).abs() <= 2.0, "shard {shard}: {users}, mean {mean}: {plan:?}");
        }
        let targets: Vec<ShardId> = plan.moves.iter().map(|m| m.to).collect();
        assert_eq!(targets, [2, 3]);
        // Shard 0 holds the even buckets, shard 1 the odd ones.
        for mv in &plan.moves {
            assert!(mv.buckets.iter().any(|b| b % 2 == 0) && mv.buckets.iter().any(|b| b % 2 == 1), "{mv:?}");
        }
        assert_eq!(plan, super::plan(&before), "the same counts, the same plan");
    }
}
