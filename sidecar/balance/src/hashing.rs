//! Consistent-hash tables (ketama ring, Maglev), built once per membership change.
//!
//! Both map a 64-bit request hash to an index into the balancer's member list. They are built
//! over every non-draining member regardless of health: health and ejections change lazily and
//! often, so instead of rebuilding, a lookup that lands on an unusable member walks on to the
//! next usable one. Keys of usable members therefore never move when another one fails.

use std::fmt::Write as _;

use xxhash_rust::xxh64::xxh64;

/// Envoy's default `maximum_ring_size`.
pub(crate) const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's upper bound on the Maglev table size.
pub(crate) const MAX_MAGLEV_TABLE: u64 = 5_000_011;
pub(crate) const DEFAULT_MAGLEV_TABLE: u64 = 65_537;

/// One hashing member: its index in the balancer, its stable name and weight.
pub(crate) struct HashMember {
    pub(crate) index: usize,
    pub(crate) key: String,
    pub(crate) weight: u32,
}

#[derive(Debug)]
pub(crate) enum HashTable {
    /// Sorted by hash.
    Ring(Vec<(u64, usize)>),
    Maglev(Vec<usize>),
}

impl HashTable {
    /// Walks the table from `hash`'s position and returns the first member `usable` accepts.
    pub(crate) fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            HashTable::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                let start = ring.partition_point(|&(h, _)| h < hash) % ring.len();
                (0..ring.len())
                    .map(|k| ring[(start + k) % ring.len()].1)
                    .find(|&i| usable(i))
            }
            HashTable::Maglev(table) => {
                let len = u64::try_from(table.len()).ok().filter(|&l| l > 0)?;
                let start = hash % len;
                (0..len)
                    .filter_map(|k| usize::try_from((start + k) % len).ok())
                    .map(|slot| table[slot])
                    .find(|&i| usable(i))
            }
        }
    }

    /// Number of table entries per member index (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn entries_of(&self, index: usize) -> usize {
        match self {
            HashTable::Ring(ring) => ring.iter().filter(|&&(_, i)| i == index).count(),
            HashTable::Maglev(table) => table.iter().filter(|&&i| i == index).count(),
        }
    }
}

/// Ketama ring: each member hashed as `"<addr>_<n>"` with xxHash64 (as Envoy), with a number of
/// entries proportional to its weight and at least `min_ring_size` entries in all.
///
/// Unlike Envoy, which scales entries by the smallest normalised weight (so one member leaving
/// changes everyone's entry count and moves keys between survivors), each member gets a fixed
/// [`RING_POINTS_PER_WEIGHT`] entries per unit of weight, whatever the others: a membership
/// change leaves the other members' entries untouched and only the leaver's keys move. The
/// count is raised (doubling) only when the whole ring would fall short of `min_ring_size`
/// (total weight below 2 with the default 1,024), and lowered only above the maximum ring size;
/// only across those bounds do survivors' keys move. The cost is memory: 16 bytes per entry,
/// 8 KiB per unit-weight endpoint.
/// Ring entries per unit of weight; see [`build_ring`]. Enough that 3 equal members already fill
/// Envoy's default minimum ring (1,024), so ordinary scale-downs never resize survivors.
pub(crate) const RING_POINTS_PER_WEIGHT: f64 = 512.0;

pub(crate) fn build_ring(members: &[HashMember], min_ring_size: u64) -> HashTable {
    let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    if members.is_empty() || total == 0 {
        return HashTable::Ring(Vec::new());
    }
    let min_ring = min_ring_size.clamp(1, MAX_RING_SIZE);
    let mut per_weight = RING_POINTS_PER_WEIGHT;
    while (total as f64) * per_weight < min_ring as f64 {
        per_weight *= 2.0;
    }
    while (total as f64) * per_weight > MAX_RING_SIZE as f64 && per_weight > f64::MIN_POSITIVE {
        per_weight /= 2.0;
    }

    let entries_of = |m: &HashMember| (f64::from(m.weight) * per_weight).ceil().max(1.0) as u64;
    let mut ring = Vec::with_capacity(
        members
            .iter()
            .map(|m| usize::try_from(entries_of(m)).unwrap_or(0))
            .sum(),
    );
    // One key buffer rewritten in place: a fresh String per entry was most of the build time
    // (512,000 entries at 1,000 endpoints).
    let mut key = String::new();
    for m in members {
        // Every member keeps at least one entry, however light.
        for n in 0..entries_of(m) {
            key.clear();
            let _ = write!(key, "{}_{n}", m.key);
            ring.push((xxh64(key.as_bytes(), 0), m.index));
        }
    }
    // Ties broken by member index (members are sorted by address) so a rebuild is identical.
    ring.sort_unstable();
    HashTable::Ring(ring)
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The table size actually used: the algorithm only fills every slot when the size is prime, so
/// a non-prime request is rounded up to the next prime (and clamped as Envoy does).
pub(crate) fn maglev_table_size(requested: u64) -> u64 {
    let mut n = if requested == 0 {
        DEFAULT_MAGLEV_TABLE
    } else {
        requested.clamp(2, MAX_MAGLEV_TABLE)
    };
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// Maglev (Eisenbud et al. 2016, pseudocode listing 1) with Envoy's weighting: each round a
/// member claims its next preferred free slot only when its accumulated weight allows it, so
/// slot counts are proportional to weight.
pub(crate) fn build_maglev(members: &[HashMember], requested_size: u64) -> HashTable {
    if members.is_empty() {
        return HashTable::Maglev(Vec::new());
    }
    let size = maglev_table_size(requested_size);
    struct Build {
        index: usize,
        offset: u64,
        skip: u64,
        weight: u64,
        target: u64,
        next: u64,
    }
    let max_weight = members
        .iter()
        .map(|m| u64::from(m.weight))
        .max()
        .unwrap_or(1);
    let mut builds: Vec<Build> = members
        .iter()
        .map(|m| Build {
            index: m.index,
            offset: xxh64(m.key.as_bytes(), 0) % size,
            skip: xxh64(m.key.as_bytes(), 1) % (size - 1) + 1,
            weight: u64::from(m.weight.max(1)),
            target: 0,
            next: 0,
        })
        .collect();

    let Ok(len) = usize::try_from(size) else {
        return HashTable::Maglev(Vec::new());
    };
    let mut table: Vec<Option<usize>> = vec![None; len];
    let mut filled = 0u64;
    let mut iteration = 1u64;
    while filled < size {
        for b in builds.iter_mut() {
            if filled >= size {
                break;
            }
            // A member of max weight takes a slot every round, one of a third of it every
            // third round, and so on.
            if iteration * b.weight < b.target {
                continue;
            }
            b.target += max_weight;
            let slot = loop {
                let c = (b.offset + b.skip * b.next) % size;
                b.next += 1;
                let c = usize::try_from(c).unwrap_or(0);
                if table[c].is_none() {
                    break c;
                }
            };
            table[slot] = Some(b.index);
            filled += 1;
        }
        iteration += 1;
    }
    HashTable::Maglev(table.into_iter().map(|s| s.unwrap_or(0)).collect())
}
