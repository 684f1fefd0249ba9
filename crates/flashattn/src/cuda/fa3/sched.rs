//! Persistent scheduling on the host: the causal longest-first groups, the dynamic scheduler's
//! counters and the split tail's plan.

use super::Variant;
use crate::cuda::context::Gpu;
use crate::error::Result;
use crate::layout::Problem;

/// (head, batch) pairs per longest-first group of the persistent causal order (`Fa3Params::
/// sched_group`): `knob` when set (> 0). `kv_pair_bytes` is what one pair's K and V occupy.
pub(crate) fn sched_group(
    knob: usize,
    dynamic: bool,
    m_tiles: usize,
    pairs: usize,
    sms: usize,
    kv_pair_bytes: usize,
) -> usize {
    let g = match (knob, dynamic) {
        (g, _) if g > 0 => return g.min(pairs),
        // Static stride: longest first over the whole grid.
        (_, false) => return pairs,
        // Short sequences: groups of enough tiles for two waves of CTAs, so that the CTAs
        // running together read the K/V of a few heads (L2).
        _ if m_tiles <= 32 => (2 * sms).div_ceil(m_tiles),
        // Long ones: longest first over as many pairs as keep their K/V within a budget of L2
        // (H100, "Step 13": causal 8k +3..5% over the whole grid, which streams the K/V of
        // every head at once).
        _ => usize::MAX,
    };
    let g = g
        .min((SCHED_L2_BYTES / kv_pair_bytes.max(1)).max(1))
        .clamp(1, pairs);
    // Groups of (nearly) equal size: a small last group would leave its longest tiles for the
    // end of the launch (the kernel runs a smaller group first anyway).
    pairs.div_ceil(pairs.div_ceil(g))
}

/// K/V bytes the CTAs running together should stay within (H100: 50 MB of L2).
const SCHED_L2_BYTES: usize = 32 << 20;

/// The dynamic scheduler's counters ([`Gpu::sched_counters`]) when `dynamic`, else 0.
pub(crate) fn tile_counter(gpu: &Gpu, dynamic: bool) -> Result<u64> {
    if dynamic {
        gpu.sched_counters()
    } else {
        Ok(0)
    }
}

/// The split tail of a launch (`Fa3Params::t_main` ..): `tiles` equal work tiles of `n` key
/// tiles each on `grid` CTAs, the tail cut into `ranges` ranges. `None` where it cannot pay: no
/// partly filled last round, or ranges so short that a piece's extra tile boundary and merge
/// (counted as two key tiles) leave the tail no shorter than a whole tile, or more key tiles
/// than the kernel's 32-bit range arithmetic takes. Else (t_main, ranges, key tiles in the tail).
pub(crate) fn split_tail(
    tiles: usize,
    grid: usize,
    ranges: usize,
    n: usize,
) -> Option<(usize, usize, usize)> {
    if grid == 0 || ranges == 0 || tiles <= grid || tiles.is_multiple_of(grid) {
        return None;
    }
    let tail = tiles % grid;
    let w = tail * n;
    // The kernel's range arithmetic is 32-bit: W · ranges < 2^31.
    (w.div_ceil(ranges) + 2 < n && w * ranges <= i32::MAX as usize).then_some((
        tiles - tail,
        ranges,
        w,
    ))
}

/// Persistent CTAs for `tiles` work tiles on `sms` multiprocessors with the `grid` knob `cap`
/// ([`Variant::grid_cap`]): 0 = one per SM (at most one per tile), 1 = the fewest CTAs that
/// still take `⌈tiles / sms⌉` rounds, n > 1 = at most n.
pub(crate) fn persistent_grid(tiles: usize, sms: usize, cap: usize) -> usize {
    let full = tiles.min(sms);
    match cap {
        _ if full == 0 => 0,
        0 => full,
        1 => tiles.div_ceil(tiles.div_ceil(full)),
        n => full.min(n),
    }
}

/// The work tiles of `var` on `problem` (query tiles of packed rows × query heads × batch) and
/// the persistent CTAs that take them on `sms` multiprocessors: the one count that both the
/// launch's grid and its split tail ([`split_of`]) are derived from.
pub(super) fn work_and_grid(var: &Variant, problem: &Problem, sms: usize) -> (usize, usize) {
    let tiles = (problem.max_sq * var.pack).div_ceil(var.bq()) * problem.heads_q * problem.batch;
    (tiles, persistent_grid(tiles, sms, var.grid_cap))
}

/// The split tail of `var` launched on `problem` as `tiles` work tiles on `grid` persistent
/// CTAs ([`work_and_grid`], [`split_tail`]).
pub(super) fn split_of(
    var: &Variant,
    problem: &Problem,
    tiles: usize,
    grid: usize,
) -> Option<(usize, usize, usize)> {
    if !var.splits() || var.split != 1 || problem.batch == 0 || problem.max_sq == 0 {
        return None;
    }
    let ranges = if var.split_ranges > 0 {
        var.split_ranges.min(8 * grid)
    } else {
        grid
    };
    split_tail(tiles, grid, ranges, problem.max_sk.div_ceil(var.bk))
}

/// The split tail that [`forward_into_with`](super::forward_into_with) runs for `problem` with knobs `tune` on `gpu`
/// (tests, benchmarks): (whole tiles before it, ranges, key tiles in it), `None` without one.
pub fn split_plan(gpu: &Gpu, problem: &Problem, tune: &str) -> Option<(usize, usize, usize)> {
    let var = Variant::tuned(problem, false, tune);
    let (tiles, grid) = work_and_grid(&var, problem, gpu.sm_count() as usize);
    split_of(&var, problem, tiles, grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistent_grid_keeps_the_rounds() {
        // 2048 tiles on 132 SMs: 16 rounds either way, on 128 CTAs with `grid=1`.
        assert_eq!(persistent_grid(2048, 132, 0), 132);
        assert_eq!(persistent_grid(2048, 132, 1), 128);
        assert_eq!(persistent_grid(1024, 132, 1), 128);
        assert_eq!(persistent_grid(4096, 132, 1), 128);
        assert_eq!(persistent_grid(100, 132, 1), 100);
        assert_eq!(persistent_grid(2048, 132, 120), 120);
        assert_eq!(persistent_grid(2048, 132, 500), 132);
        assert_eq!(persistent_grid(0, 132, 1), 0);
    }

    #[test]
    fn split_tail_cuts_only_a_partly_filled_last_round_that_pays() {
        // Every SPEC shape at d = 128: 2048 tiles of 16 key tiles (2k) on 132 SMs.
        assert_eq!(split_tail(2048, 132, 132, 16), Some((1980, 132, 68 * 16)));
        // 1024 tiles of 26 key tiles: a tail of 100, ranges of 20, +2 < 26.
        assert_eq!(split_tail(1024, 132, 132, 26), Some((924, 132, 2600)));
        // No partly filled round, or a single one.
        assert_eq!(split_tail(264, 132, 132, 16), None);
        assert_eq!(split_tail(100, 132, 132, 16), None);
        // Ranges (3 key tiles) + 2 not shorter than a tile (4): no gain.
        assert_eq!(split_tail(2048, 132, 132, 4), None);
        // W · ranges beyond the kernel's 32-bit arithmetic.
        assert_eq!(split_tail(133, 132, 132, 20_000_000), None);
    }

    #[test]
    fn causal_groups_fit_l2_and_split_the_pairs_evenly() {
        const MIB: usize = 1 << 20;
        // d = 128 causal 4k (Bq 128): two waves want 9 pairs of 64; 8 groups of 8 instead of
        // 7 of 9 and one of 1.
        assert_eq!(sched_group(0, true, 32, 64, 132, 2 * MIB), 8);
        // Long: as many pairs as keep their K/V within 32 MiB (8k: d = 128 on Bq 192, d = 256).
        assert_eq!(sched_group(0, true, 43, 32, 132, 4 * MIB), 8);
        assert_eq!(sched_group(0, true, 64, 16, 132, 8 * MIB), 4);
        assert_eq!(sched_group(0, true, 128, 16, 132, 64 * MIB), 1);
        // Few pairs, a knob, the static stride.
        assert_eq!(sched_group(0, true, 10, 3, 132, MIB), 3);
        assert_eq!(sched_group(5, true, 64, 128, 132, 64 * MIB), 5);
        assert_eq!(sched_group(0, false, 64, 128, 132, 64 * MIB), 128);
    }
}
