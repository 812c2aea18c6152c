//! Offsets in one arena by liveness (the measure-then-allocate scheme of ggml-alloc).
//!
//! The measuring pass ([`super::Ctx::measure`]) runs a device forward without launching
//! anything and records, for every temporary buffer, its size and the first and last
//! operation that touches it. [`assign`] then places the buffers in one arena: in order of
//! first use, each goes into the smallest gap left by the buffers still alive at that point
//! (best fit), or at the end. Two buffers whose lifetimes overlap never overlap in memory (a
//! property test checks it over random lifetimes); a buffer whose last use precedes
//! another's first may share its bytes. In-place operation is the forward's choice (it
//! passes the same view as input and output where the kernel allows), never the planner's.

/// A temporary buffer's size and lifetime in operation indices (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub bytes: usize,
    pub first: usize,
    pub last: usize,
}

impl Lifetime {
    pub fn overlaps(&self, o: &Lifetime) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

/// Every buffer starts at a multiple of this (as cudaMalloc aligns).
pub const ALIGN: usize = 256;

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The offset of each buffer and the arena size they need.
pub fn assign(bufs: &[Lifetime]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..bufs.len()).collect();
    order.sort_by_key(|&i| (bufs[i].first, i));
    let mut offsets = vec![0usize; bufs.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(bufs.len());
    let mut peak = 0usize;
    for &i in &order {
        let b = bufs[i];
        let size = align_up(b.bytes.max(1));
        // The placed buffers alive during b's lifetime, by offset.
        let mut live: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| bufs[j].overlaps(&b))
            .map(|&j| (offsets[j], offsets[j] + align_up(bufs[j].bytes.max(1))))
            .collect();
        live.sort_unstable();
        // Best fit among the gaps between them; else after the last.
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0usize;
        for &(start, end) in &live {
            if start >= cursor + size {
                let gap = start - cursor;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(end);
        }
        let offset = best.map(|(_, o)| o).unwrap_or(cursor);
        offsets[i] = offset;
        peak = peak.max(offset + size);
        placed.push(i);
    }
    (offsets, peak)
}

/// The most bytes alive at once (a lower bound on any arena for these lifetimes).
pub fn live_peak(bufs: &[Lifetime]) -> usize {
    let end = bufs.iter().map(|b| b.last).max().unwrap_or(0);
    (0..=end)
        .map(|t| {
            bufs.iter()
                .filter(|b| b.first <= t && t <= b.last)
                .map(|b| align_up(b.bytes.max(1)))
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn live_buffers_never_overlap_over_random_configs() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let n = 1 + rng.below(60) as usize;
            let ops = 1 + rng.below(80) as usize;
            let bufs: Vec<Lifetime> = (0..n)
                .map(|_| {
                    let first = rng.below(ops as u64) as usize;
                    let len = rng.below(1 + (ops - first) as u64) as usize;
                    // Sizes from a byte to a few MB, some tiny, some huge.
                    let bytes = match rng.below(4) {
                        0 => 1 + rng.below(300) as usize,
                        1 => 1 + rng.below(70_000) as usize,
                        _ => 1 + rng.below(5 << 20) as usize,
                    };
                    Lifetime {
                        bytes,
                        first,
                        last: (first + len).min(ops - 1),
                    }
                })
                .collect();
            let (offsets, peak) = assign(&bufs);
            for i in 0..n {
                assert_eq!(offsets[i] % ALIGN, 0);
                assert!(
                    offsets[i] + bufs[i].bytes <= peak,
                    "seed {seed}: past the arena"
                );
                for j in i + 1..n {
                    if bufs[i].overlaps(&bufs[j]) {
                        let (a0, a1) = (offsets[i], offsets[i] + bufs[i].bytes);
                        let (b0, b1) = (offsets[j], offsets[j] + bufs[j].bytes);
                        assert!(
                            a1 <= b0 || b1 <= a0,
                            "seed {seed}: buffers {i} {:?} at {a0} and {j} {:?} at {b0} are live together and overlap",
                            bufs[i],
                            bufs[j]
                        );
                    }
                }
            }
            let lower = live_peak(&bufs);
            let total: usize = bufs.iter().map(|b| align_up(b.bytes)).sum();
            assert!(
                lower <= peak && peak <= total,
                "seed {seed}: {lower} <= {peak} <= {total}"
            );
        }
    }

    #[test]
    fn a_chain_reuses_memory() {
        // x0 → x1 → x2 → …, each alive for two operations: two buffers' worth suffice.
        let bufs: Vec<Lifetime> = (0..10)
            .map(|i| Lifetime {
                bytes: 1000,
                first: i,
                last: i + 1,
            })
            .collect();
        let (_, peak) = assign(&bufs);
        assert_eq!(peak, 2 * align_up(1000));
    }
}
