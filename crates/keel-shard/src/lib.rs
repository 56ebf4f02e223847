//! Where a key lives: a stable hash from key to one of [`BUCKETS`] virtual buckets, a map from bucket
//! to shard, and a [`Router`] that hands out the per-shard handle for a key.
//!
//! Keys are hashed to buckets rather than straight to shards so that the number of shards can change
//! without rehashing anything: moving a bucket to another shard moves exactly the keys in it, and only
//! the shard map (a 1024-entry table) changes. The hash must therefore never change: the reference
//! vectors in the tests below pin it.

use sha2::{Digest, Sha256};
use std::fmt;

/// The number of virtual buckets. Fixed forever: changing it would move almost every key.
pub const BUCKETS: u16 = 1024;

/// A virtual bucket, `0..BUCKETS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket(u16);

impl Bucket {
    /// The bucket a key belongs to: the first eight bytes of its SHA-256, big-endian, modulo
    /// [`BUCKETS`]. SHA-256 is slower than a non-cryptographic hash but is specified everywhere,
    /// so any tool (psql's `sha256()`, a script) can compute the same bucket.
    pub fn of(key: &[u8]) -> Bucket {
        let digest = Sha256::digest(key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Bucket((u64::from_be_bytes(first) % u64::from(BUCKETS)) as u16)
    }

    pub fn new(index: u16) -> Option<Bucket> {
        (index < BUCKETS).then_some(Bucket(index))
    }

    pub fn index(self) -> u16 {
        self.0
    }
}

/// A shard number: the position of its database in the configured list.
pub type ShardId = u16;

/// An error building a [`ShardMap`].
#[derive(Debug, PartialEq, Eq)]
pub enum MapError {
    NoShards,
    BucketOutOfRange(u16),
    MissingBucket(u16),
    DuplicateBucket(u16),
    UnknownShard { bucket: u16, shard: ShardId, shards: u16 },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::NoShards => write!(f, "at least one shard is needed"),
            MapError::BucketOutOfRange(b) => write!(f, "bucket {b} is out of range 0..{BUCKETS}"),
            MapError::MissingBucket(b) => write!(f, "bucket {b} is assigned to no shard"),
            MapError::DuplicateBucket(b) => write!(f, "bucket {b} is assigned twice"),
            MapError::UnknownShard { bucket, shard, shards } => {
                write!(f, "bucket {bucket} is assigned to shard {shard}, but only {shards} shard(s) are configured")
            }
        }
    }
}

impl std::error::Error for MapError {}

/// Which shard holds each bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    shard_of: Vec<ShardId>,
    shards: u16,
}

impl ShardMap {
    /// The initial layout for `shards` shards: bucket `b` on shard `b % shards`.
    pub fn uniform(shards: u16) -> Result<ShardMap, MapError> {
        if shards == 0 {
            return Err(MapError::NoShards);
        }
        let shard_of = (0..BUCKETS).map(|b| b % shards).collect();
        Ok(ShardMap { shard_of, shards })
    }

    /// A map from explicit `(bucket, shard)` pairs, as stored in a database. Every bucket must be
    /// assigned exactly once, to a shard below `shards`.
    pub fn from_assignments(
        shards: u16,
        assignments: impl IntoIterator<Item = (u16, ShardId)>,
    ) -> Result<ShardMap, MapError> {
        if shards == 0 {
            return Err(MapError::NoShards);
        }
        let mut shard_of: Vec<Option<ShardId>> = vec![None; usize::from(BUCKETS)];
        for (bucket, shard) in assignments {
            let slot = shard_of.get_mut(usize::from(bucket)).ok_or(MapError::BucketOutOfRange(bucket))?;
            if slot.is_some() {
                return Err(MapError::DuplicateBucket(bucket));
            }
            if shard >= shards {
                return Err(MapError::UnknownShard { bucket, shard, shards });
            }
            *slot = Some(shard);
        }
        let shard_of = shard_of
            .into_iter()
            .enumerate()
            .map(|(b, s)| s.ok_or(MapError::MissingBucket(b as u16)))
            .collect::<Result<_, _>>()?;
        Ok(ShardMap { shard_of, shards })
    }

    pub fn shard_of(&self, bucket: Bucket) -> ShardId {
        self.shard_of[usize::from(bucket.0)]
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// All `(bucket, shard)` pairs, in bucket order: what to store.
    pub fn assignments(&self) -> impl Iterator<Item = (u16, ShardId)> + '_ {
        self.shard_of.iter().enumerate().map(|(b, s)| (b as u16, *s))
    }
}

/// Routes keys to per-shard handles (connection pools, in practice) through a [`ShardMap`].
#[derive(Debug)]
pub struct Router<H> {
    map: ShardMap,
    shards: Vec<H>,
}

/// Where a key was routed.
#[derive(Debug)]
pub struct Route<'a, H> {
    pub bucket: Bucket,
    pub shard: ShardId,
    pub handle: &'a H,
}

impl<H> Router<H> {
    /// One handle per shard, in shard order; the map must name exactly these shards.
    pub fn new(map: ShardMap, shards: Vec<H>) -> Result<Router<H>, MapError> {
        if usize::from(map.shards()) != shards.len() {
            let shard = map.shard_of.iter().copied().max().unwrap_or(0);
            return Err(MapError::UnknownShard {
                bucket: map.shard_of.iter().position(|s| *s == shard).unwrap_or(0) as u16,
                shard,
                shards: shards.len() as u16,
            });
        }
        Ok(Router { map, shards })
    }

    pub fn route(&self, key: &[u8]) -> Route<'_, H> {
        let bucket = Bucket::of(key);
        let shard = self.map.shard_of(bucket);
        Route { bucket, shard, handle: &self.shards[usize::from(shard)] }
    }

    /// Every shard with its number: for scatter-gather questions and per-shard maintenance.
    pub fn all(&self) -> impl Iterator<Item = (ShardId, &H)> {
        self.shards.iter().enumerate().map(|(i, h)| (i as ShardId, h))
    }

    pub fn map(&self) -> &ShardMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference vectors: if one of these changes, every stored key would move to another bucket.
    /// They were computed independently with
    /// `printf %s KEY | sha256sum | cut -c1-16` → hex → integer mod 1024.
    #[test]
    fn bucket_hash_reference_vectors() {
        let vectors: &[(&str, u16)] =
            &[("", 20), ("a", 458), ("keel", 722), ("0190c5a2-7b3e-7c4d-9e8f-0123456789ab", 418), ("user-42", 329)];
        for (key, bucket) in vectors {
            assert_eq!(Bucket::of(key.as_bytes()).index(), *bucket, "bucket of {key:?}");
        }
    }

    #[test]
    fn buckets_spread_evenly_over_keys() {
        let mut counts = vec![0u32; usize::from(BUCKETS)];
        for i in 0..102_400 {
            counts[usize::from(Bucket::of(format!("user-{i}").as_bytes()).index())] += 1;
        }
        // 100 keys expected per bucket; a fair hash stays well inside 50..150.
        assert!(counts.iter().all(|c| (50..150).contains(c)), "{counts:?}");
    }

    #[test]
    fn uniform_map_round_trips_through_assignments() {
        let map = ShardMap::uniform(3).unwrap();
        let again = ShardMap::from_assignments(3, map.assignments()).unwrap();
        assert_eq!(map, again);
        assert_eq!(map.shard_of(Bucket::new(5).unwrap()), 2);
    }

    #[test]
    fn incomplete_or_inconsistent_maps_are_refused() {
        assert_eq!(ShardMap::uniform(0), Err(MapError::NoShards));
        let missing = ShardMap::from_assignments(2, (1..BUCKETS).map(|b| (b, 0)));
        assert_eq!(missing, Err(MapError::MissingBucket(0)));
        let dup = ShardMap::from_assignments(2, [(0, 0), (0, 1)]);
        assert_eq!(dup, Err(MapError::DuplicateBucket(0)));
        let unknown = ShardMap::from_assignments(2, [(0, 2)]);
        assert_eq!(unknown, Err(MapError::UnknownShard { bucket: 0, shard: 2, shards: 2 }));
        assert!(Router::new(ShardMap::uniform(2).unwrap(), vec!["only one"]).is_err());
    }

    #[test]
    fn router_sends_a_key_to_the_shard_of_its_bucket() {
        let router = Router::new(ShardMap::uniform(2).unwrap(), vec!["s0", "s1"]).unwrap();
        let route = router.route(b"keel");
        assert_eq!(route.bucket.index(), 722);
        assert_eq!(route.shard, 0);
        assert_eq!(*route.handle, "s0");
        assert_eq!(router.all().count(), 2);
    }
}
