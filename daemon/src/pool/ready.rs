//! The ready set of one key group: the keys that may serve now, kept in one
//! order per strategy so that selection never scans every key.
//!
//! - least recently used: a B-tree on `(last use, key)`;
//! - least loaded: a B-tree on `(in flight, last use, key)`;
//! - random and weighted: Fenwick trees of counts and weights over the
//!   group's member positions, sampled in O(log n).

use std::collections::BTreeSet;
use std::ops::Bound;

/// What the ready set orders a key by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub idx: u32,
    /// Position in the group's member list (the Fenwick index).
    pub gpos: u32,
    pub seq: u64,
    pub in_flight: u32,
    pub weight: u32,
}

pub(super) type LruKey = (u64, u32);
pub(super) type LoadKey = (u32, u64, u32);

impl Slot {
    pub(crate) fn lru(&self) -> LruKey {
        (self.seq, self.idx)
    }

    pub(crate) fn load(&self) -> LoadKey {
        (self.in_flight, self.seq, self.idx)
    }
}

/// A Fenwick (binary indexed) tree of non-negative sums that can grow.
#[derive(Debug, Clone, Default)]
pub(super) struct Fenwick {
    /// 1-based: `tree[i - 1]` covers `(i - lowbit(i), i]`.
    tree: Vec<u64>,
    total: u64,
}

fn lowbit(i: usize) -> usize {
    i & i.wrapping_neg()
}

impl Fenwick {
    /// Sum of the first `n` positions.
    fn prefix(&self, mut n: usize) -> u64 {
        let mut s = 0;
        while n > 0 {
            s += self.tree[n - 1];
            n -= lowbit(n);
        }
        s
    }

    /// Grows to at least `len` positions (new positions hold 0).
    pub(crate) fn grow(&mut self, len: usize) {
        while self.tree.len() < len {
            let i = self.tree.len() + 1;
            let v = self.prefix(i - 1) - self.prefix(i - lowbit(i));
            self.tree.push(v);
        }
    }

    pub(crate) fn add(&mut self, pos: usize, delta: i64) {
        self.grow(pos + 1);
        self.total = self.total.wrapping_add_signed(delta);
        let mut i = pos + 1;
        while i <= self.tree.len() {
            self.tree[i - 1] = self.tree[i - 1].wrapping_add_signed(delta);
            i += lowbit(i);
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The position where the running sum first exceeds `r` (`r < total`).
    pub(crate) fn find(&self, mut r: u64) -> Option<usize> {
        if r >= self.total {
            return None;
        }
        let n = self.tree.len();
        let mut pos = 0;
        let mut step = if n == 0 {
            0
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next - 1] <= r {
                pos = next;
                r -= self.tree[next - 1];
            }
            step >>= 1;
        }
        Some(pos)
    }
}

/// Ready keys. The least-recently-used order is always kept (it is also the
/// membership set); the other orders are built the first time a strategy
/// needs them and kept from then on, so the default strategy pays for one
/// B-tree only.
#[derive(Debug, Default)]
pub(super) struct ReadySet {
    lru: BTreeSet<LruKey>,
    load: Option<BTreeSet<LoadKey>>,
    counts: Option<Fenwick>,
    weights: Option<Fenwick>,
}

impl ReadySet {
    pub(crate) fn insert(&mut self, s: Slot) {
        if self.lru.insert(s.lru()) {
            if let Some(load) = &mut self.load {
                load.insert(s.load());
            }
            if let Some(c) = &mut self.counts {
                c.add(s.gpos as usize, 1);
            }
            if let Some(w) = &mut self.weights {
                w.add(s.gpos as usize, s.weight as i64);
            }
        }
    }

    pub(crate) fn remove(&mut self, s: Slot) {
        if self.lru.remove(&s.lru()) {
            if let Some(load) = &mut self.load {
                load.remove(&s.load());
            }
            if let Some(c) = &mut self.counts {
                c.add(s.gpos as usize, -1);
            }
            if let Some(w) = &mut self.weights {
                w.add(s.gpos as usize, -(s.weight as i64));
            }
        }
    }

    /// Re-keys a member whose last use or load changed (same position and weight).
    pub(crate) fn rekey(&mut self, old: Slot, new: Slot) {
        if old.seq != new.seq && self.lru.remove(&old.lru()) {
            self.lru.insert(new.lru());
        }
        if let Some(load) = &mut self.load {
            if old.load() != new.load() && load.remove(&old.load()) {
                load.insert(new.load());
            }
        }
    }

    /// Builds the least-loaded order if it is not kept yet.
    pub(crate) fn ensure_load(&mut self, slot_of: impl Fn(u32) -> Slot) {
        if self.load.is_none() {
            self.load = Some(self.lru.iter().map(|&(_, i)| slot_of(i).load()).collect());
        }
    }

    /// Builds the count and weight trees if they are not kept yet.
    pub(crate) fn ensure_sampling(&mut self, slot_of: impl Fn(u32) -> Slot) {
        if self.counts.is_none() {
            let (mut c, mut w) = (Fenwick::default(), Fenwick::default());
            for &(_, i) in &self.lru {
                let s = slot_of(i);
                c.add(s.gpos as usize, 1);
                w.add(s.gpos as usize, s.weight as i64);
            }
            self.counts = Some(c);
            self.weights = Some(w);
        }
    }

    #[cfg(test)]
    pub(crate) fn lru_contains(&self, k: LruKey) -> bool {
        self.lru.contains(&k)
    }

    pub(crate) fn len(&self) -> u64 {
        self.lru.len() as u64
    }

    /// Total weight (needs [`ReadySet::ensure_sampling`]).
    pub(crate) fn total_weight(&self) -> u64 {
        self.weights.as_ref().map_or(0, Fenwick::total)
    }

    /// The least recently used member after `after`.
    pub(crate) fn lru_after(&self, after: Option<LruKey>) -> Option<LruKey> {
        match after {
            None => self.lru.first().copied(),
            Some(k) => self
                .lru
                .range((Bound::Excluded(k), Bound::Unbounded))
                .next()
                .copied(),
        }
    }

    /// The least loaded member after `after` (needs [`ReadySet::ensure_load`]).
    pub(crate) fn load_after(&self, after: Option<LoadKey>) -> Option<LoadKey> {
        let load = self.load.as_ref()?;
        match after {
            None => load.first().copied(),
            Some(k) => load
                .range((Bound::Excluded(k), Bound::Unbounded))
                .next()
                .copied(),
        }
    }

    /// A member position, uniformly (`r < len`; needs [`ReadySet::ensure_sampling`]).
    pub(crate) fn pick_uniform(&self, r: u64) -> Option<usize> {
        self.counts.as_ref()?.find(r)
    }

    /// A member position, by weight (`r < total_weight`).
    pub(crate) fn pick_weighted(&self, r: u64) -> Option<usize> {
        self.weights.as_ref()?.find(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenwick_grows_and_finds_by_running_sum() {
        let mut f = Fenwick::default();
        f.add(0, 2);
        f.add(4, 3);
        f.grow(9);
        f.add(7, 1);
        assert_eq!(f.total(), 6);
        let picks: Vec<_> = (0..6).map(|r| f.find(r).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 4, 4, 4, 7]);
        assert_eq!(f.find(6), None);
        f.add(4, -3);
        assert_eq!((f.find(2), f.total()), (Some(7), 3));
    }

    #[test]
    fn ready_set_orders_by_last_use_and_load() {
        let mut r = ReadySet::default();
        let a = Slot {
            idx: 0,
            gpos: 0,
            seq: 5,
            in_flight: 0,
            weight: 1,
        };
        let b = Slot {
            idx: 1,
            gpos: 1,
            seq: 2,
            in_flight: 3,
            weight: 4,
        };
        r.insert(a);
        r.insert(b);
        let slots = [a, b];
        r.ensure_load(|i| slots[i as usize]);
        r.ensure_sampling(|i| slots[i as usize]);
        assert_eq!(r.lru_after(None), Some((2, 1)));
        assert_eq!(r.lru_after(Some((2, 1))), Some((5, 0)));
        assert_eq!(r.load_after(None), Some((0, 5, 0)));
        assert_eq!((r.len(), r.total_weight()), (2, 5));
        let b2 = Slot { seq: 9, ..b };
        r.rekey(b, b2);
        assert_eq!(r.lru_after(None), Some((5, 0)));
        r.remove(b2);
        assert_eq!((r.len(), r.total_weight()), (1, 1));
        assert_eq!(r.pick_weighted(0), Some(0));
    }
}
