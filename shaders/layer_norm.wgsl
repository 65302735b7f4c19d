// LayerNorm forward: y = (x - mean) / sqrt(var + eps) * gamma + beta over each row; with the
// shader def RMS, RMSNorm: y = x / sqrt(mean(x^2) + eps) * gamma, the same kernels with no shift
// and no mean (one reduction instead of two).
//
// Algorithm: shifted two-pass statistics. Every value is first shifted by the row's first element,
// d = x - x[0], which is exact for offset data (Sterbenz), so the mean of d, the variance around
// it and the output (d - mean_d) * rstd never cancel large numbers in f32. A plain two-pass in f32
// loses 1e-2..1e-1 on rows with mean 1e4 and spread 1e-2. Each thread adds its values in a fixed
// order and the sums over threads have a fixed order: repeated runs give identical bits.
//
// Two entry points, the same arithmetic in the same order (so the same bits for a given T):
// - `layer_norm_held`: T threads per row, WG / T rows per workgroup (several rows for short rows,
//   so few threads idle); each thread keeps its K elements of the row in registers, so the input
//   is read from memory once. For rows of at most T * K elements.
// - `layer_norm`: one workgroup per row of any length; the statistics passes and the output pass
//   each read the row again (from cache while the row fits there).
//
// Rows whose statistics leave f32's range are redone scaled by a power of two (see `rescale`).
//
// Limits: rows of up to 2^24 features keep f32(features) exact; a chunk's elements must fit u32
// (the host splits larger tensors). Workgroups beyond the grid's first side use its y dimension.
//
// Shader defs (src/gpu/layer_norm.rs picks them): T, threads per row (a power of two, at most
// WG); K, elements each thread holds in `layer_norm_held`; VEC4 for rows whose length is a
// multiple of 4 (every load and store moves a vec4), VEC2 for the other even lengths, f32
// elements otherwise; SUBGROUP for the subgroup workgroup sum (see gpunorm::reduce); RMS for
// RMSNorm; ADD for the fused residual add (the rows are x + residual, and the sum is written out
// too); PACKED for half tensors (x, y, dy, residual and sum two values per u32: f16, or bf16
// with BF16; see gpunorm::half), computed in f32 as any other. gamma, beta and the gradients
// stay f32. SAVE: the forward kernels also write each row's moments (shift, mean_d, rstd, s)
// to `row_moments`, for a later backward pass; SAVED: the backward reads them from there
// instead of recomputing them.

#import gpunorm::common::{WG, FLAG_GAMMA, FLAG_BETA, FLAG_ACCUMULATE}
#import gpunorm::reduce::{Invocation, workgroup_sum}
#import gpunorm::half::{unpack_pair, pack_pair}

const T: u32 = #{T}u;
const K: u32 = #{K}u;

#ifdef VEC4
alias V = vec4<f32>;
const W: u32 = 4u;

fn hsum(v: V) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn first(v: V) -> f32 {
    return v.x;
}

fn too_big(v: V) -> bool {
    return any(abs(v) > V(BIG_VALUE));
}
#else ifdef VEC2
alias V = vec2<f32>;
const W: u32 = 2u;

fn hsum(v: V) -> f32 {
    return v.x + v.y;
}

fn first(v: V) -> f32 {
    return v.x;
}

fn too_big(v: V) -> bool {
    return any(abs(v) > V(BIG_VALUE));
}
#else
alias V = f32;
const W: u32 = 1u;

fn hsum(v: V) -> f32 {
    return v;
}

fn first(v: V) -> f32 {
    return v;
}

fn too_big(v: V) -> bool {
    return abs(v) > BIG_VALUE;
}
#endif

// E: how a V of the tensors is stored. Half tensors hold W values in W / 2 words.
#ifdef PACKED
#ifdef VEC4
alias E = vec2<u32>;

fn unpack(e: E) -> V {
    return V(unpack_pair(e.x), unpack_pair(e.y));
}

fn pack(v: V) -> E {
    return E(pack_pair(v.xy), pack_pair(v.zw));
}
#else
alias E = u32;

fn unpack(e: E) -> V {
    return unpack_pair(e);
}

fn pack(v: V) -> E {
    return pack_pair(v);
}
#endif
#else
alias E = V;

fn unpack(e: E) -> V {
    return e;
}

fn pack(v: V) -> E {
    return v;
}
#endif

// Keep in sync with `LayerNormParams` in src/gpu/layer_norm.rs (a test compares the two).
struct Params {
    rows: u32,
    features: u32,
    eps: f32,
    // FLAG_GAMMA | FLAG_BETA.
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<E>;
@group(0) @binding(2) var<storage, read_write> y: array<E>;
@group(0) @binding(3) var<storage, read> gamma: array<V>;
@group(0) @binding(4) var<storage, read> beta: array<V>;

#ifdef ADD
// The fused residual add: the rows normalized are x + residual, rounded to f32 once, and that
// sum is written out too (the new residual stream).
@group(0) @binding(9) var<storage, read> residual: array<E>;
@group(0) @binding(10) var<storage, read_write> sum_out: array<E>;
#endif

// Element i of the rows normalized: x, or x + residual (ADD), the same bits at every read.
fn load(i: u32) -> V {
#ifdef ADD
    return unpack(x[i]) + unpack(residual[i]);
#else
    return unpack(x[i]);
#endif
}

// Element i of the row starting at `base`, normalized from its centred value c = x - shift - mean.
fn store(base: u32, i: u32, c: V, rstd: f32) {
    var v = c * rstd;
    if (params.flags & FLAG_GAMMA) != 0u {
        v = v * gamma[i];
    }
    if (params.flags & FLAG_BETA) != 0u {
        v = v + beta[i];
    }
    y[base + i] = pack(v);
}

var<workgroup> segment: array<f32, WG>;

// Sum over the T threads of one row. With T == WG that is the workgroup sum; otherwise a
// shared-memory tree inside each T-thread segment, in a fixed order. Every thread of the workgroup
// must call it (it has barriers).
fn row_sum(inv: Invocation, value: f32) -> f32 {
    if T == WG {
        return workgroup_sum(inv, value);
    }
    let lane = inv.lid % T;
    segment[inv.lid] = value;
    workgroupBarrier();
    for (var stride = T / 2u; stride > 0u; stride = stride / 2u) {
        if lane < stride {
            segment[inv.lid] = segment[inv.lid] + segment[inv.lid + stride];
        }
        workgroupBarrier();
    }
    let total = segment[inv.lid - lane];
    // Nobody may overwrite a segment's sum for the next reduction before all have read it.
    workgroupBarrier();
    return total;
}

// Rows whose f32 statistics would leave f32's range are redone scaled by an exact power of two:
// 2^-100 where a difference, sum or square could overflow (spreads past about 1e15), 2^100 where
// the squares were too small to keep their bits (values under about 1e-20, with an eps too small
// to hide it). Scaling by a power of two is exact, so the scaled row's statistics are the row's,
// in range.
//
// The test never looks at an infinity or a NaN: Vulkan lets a compiler assume floats are neither,
// so a comparison or bit test for one may be folded away. Instead, a thread
// whose shifted values pass 2^50 in magnitude, or whose row's shift passes 2^100 (so x - shift
// could overflow), adds FLAGGED to the row's sum in place of its values. Without such a thread a
// row's sum stays under 2^74 (2^24 values under 2^50 each) and its squares under 2^126, so a sum
// of 2^100 or more means "redo". The common path pays a comparison per value and one per row.
const TINY_VAR: f32 = 0x1p-100f;
const TINY_EPS: f32 = 0x1p-76f;
const BIG_SHIFT: f32 = 0x1p100f;
const BIG_VALUE: f32 = 0x1p50f;
const FLAGGED: f32 = 0x1p110f;
const OVERFLOWED: f32 = 0x1p100f;
// Values a thread adds in f32 before the sum moves on: serial sums of at most this many values
// keep their rounding near that of the workgroup's tree.
const RUN: u32 = 64u;

// What a thread adds to its row's sum: its own sum, or FLAGGED where it saw a value too big.
fn flagged(sum: f32, too_big: bool) -> f32 {
    return select(sum, FLAGGED, too_big);
}

// The power of two a row is redone at, given its flagged sum and its variance; 1 for rows in
// range.
fn rescale(total: f32, var_: f32) -> f32 {
    if abs(total) >= OVERFLOWED {
        return 0x1p-100f;
    }
    if var_ < TINY_VAR && params.eps < TINY_EPS {
        return 0x1p100f;
    }
    return 1.0;
}

// 1 / sqrt(var + eps * s^2): the rstd of a row scaled by `s` whose variance (of the scaled
// values) is `var_`; for s = 1, 1 / sqrt(var + eps). Where eps * s^2 underflows to 0 (s = 2^-100)
// and the scaled row has no spread (a constant row, or a row of one value), that is the rstd of
// eps alone, 1 / (sqrt(eps) * s), which f32 holds for every eps above 1e-24.
//
// eps * s^2 is one exact scaling of eps's exponent (ldexp), never a product through s * s: that
// is 2^200 for s = 2^100, past f32, and Vulkan's float rules let a compiler form it first (eps *
// (s * s) = 0 * inf = NaN for eps 0). Rows of values near 1e-22 with eps 0 normalized to NaN on
// an H100, where squares that small flush to 0 and send the row down this path.
fn scaled_rstd(var_: f32, s: f32) -> f32 {
    let e = ldexp(params.eps, select(select(0i, 200i, s > 1.0), -200i, s < 1.0));
    if var_ + e == 0.0 && params.eps > 0.0 {
        return inverseSqrt(params.eps) / s;
    }
    return inverseSqrt(var_ + e);
}

// The shift of a row scaled by `s` (2^-100 or 2^100): x0 * s, through the exponent bits
// wherever the product is a normal number, so the same bits as the product. The rows are then
// centred as x * s - shift, and shift must not read as a product with s there: Vulkan's float
// rules let a compiler rewrite x * s - x0 * s as (x - x0) * s, which overflows for the very rows
// this path exists for. (On an H100, [f32::MAX, -f32::MAX] normalized to NaN where llvmpipe
// gives ±1; this rewrite is the suspected cause, not yet confirmed on the card.)
fn scaled_shift(x0: f32, s: f32) -> f32 {
    let bits = bitcast<u32>(x0);
    let e = (bits >> 23u) & 0xffu;
    if s < 1.0 && e > 100u && e < 255u {
        return bitcast<f32>(bits - (100u << 23u));
    }
    if s > 1.0 && e > 0u && e < 155u {
        return bitcast<f32>(bits + (100u << 23u));
    }
    return x0 * s;
}

// (shift, mean_d, var) of the row at `base` scaled by `s`, by one thread alone, in runs of RUN
// values: the rare path of `layer_norm_held`, which needs no barrier, so rows of a workgroup take
// it or not independently.
fn serial_stats(base: u32, s: f32) -> vec3<f32> {
    let n = params.features / W;
    let count = f32(params.features);
#ifdef RMS
    let shift = 0.0;
    let mean_d = 0.0;
#else
    let shift = scaled_shift(first(load(base)), s);
    var sum = 0.0;
    for (var run = 0u; run < n; run += RUN) {
        var part = 0.0;
        for (var i = run; i < min(run + RUN, n); i++) {
            part += hsum(load(base + i) * s - shift);
        }
        sum += part;
    }
    let mean_d = sum / count;
#endif
    var sq = 0.0;
    for (var run = 0u; run < n; run += RUN) {
        var part = 0.0;
        for (var i = run; i < min(run + RUN, n); i++) {
            let c = load(base + i) * s - shift - mean_d;
            part += hsum(c * c);
        }
        sq += part;
    }
    return vec3<f32>(shift, mean_d, sq / count);
}

@compute @workgroup_size(WG)
fn layer_norm_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    inv: Invocation,
) {
    let first_row = (wid.y * groups.x + wid.x) * (WG / T);
    if first_row >= params.rows {
        return;
    }
    // Threads whose row is past the end still take part in the sums (they have barriers).
    let row = first_row + inv.lid / T;
    let lane = inv.lid % T;
    let live = row < params.rows;
    let n = params.features / W;
    let base = row * n;

    // All K loads are issued before any arithmetic waits on them.
    var held: array<V, K>;
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            held[j] = load(base + i);
        }
    }
#ifdef ADD
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            sum_out[base + i] = pack(held[j]);
        }
    }
#endif
    let m = held_moments(inv, base, live, &held);
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            store(base, i, held[j], m.z);
        }
    }
#ifdef SAVE
    if live && lane == 0u {
        row_moments[row] = m;
    }
#endif
}

// The statistics of the row at `base` whose values this thread holds (lane + j * T for each j,
// as loaded), with T threads a row: returns (shift, mean_d, rstd, s) as `looped_moments` does,
// and leaves `held` centred, x * s - shift - mean_d. Threads whose row is past the end pass
// `live` false and still call it: every thread of the workgroup must (it has barriers).
fn held_moments(
    inv: Invocation,
    base: u32,
    live: bool,
    held: ptr<function, array<V, K>>,
) -> vec4<f32> {
    let lane = inv.lid % T;
    let n = params.features / W;
    let count = f32(params.features);
#ifdef RMS
    // The flag rides on the sum of squares: a flagged thread adds at least 2^110, past what
    // values under 2^50 can reach in most rows (rows that do reach it are redone, also exactly).
    var sq = 0.0;
    var big = false;
    for (var j = 0u; j < K; j++) {
        if live && lane + j * T < n {
            sq += hsum((*held)[j] * (*held)[j]);
            big = big || too_big((*held)[j]);
        }
    }
    let total = row_sum(inv, flagged(sq, big));
    var var_ = total / count;
    var centre = vec2<f32>(0.0);
#else
    var shift = 0.0;
    if live {
        shift = first(load(base));
    }
    var sum = 0.0;
    var big = abs(shift) > BIG_SHIFT;
    for (var j = 0u; j < K; j++) {
        if live && lane + j * T < n {
            (*held)[j] = (*held)[j] - shift;
            sum += hsum((*held)[j]);
            big = big || too_big((*held)[j]);
        }
    }
    let total = row_sum(inv, flagged(sum, big));
    let mean_d = total / count;

    var sq = 0.0;
    for (var j = 0u; j < K; j++) {
        if live && lane + j * T < n {
            (*held)[j] = (*held)[j] - mean_d;
            sq += hsum((*held)[j] * (*held)[j]);
        }
    }
    var var_ = row_sum(inv, sq) / count;
    var centre = vec2<f32>(shift, mean_d);
#endif
    let s = rescale(total, var_);
    if live && s != 1.0 {
        let stats = serial_stats(base, s);
        centre = stats.xy;
        for (var j = 0u; j < K; j++) {
            let i = lane + j * T;
            if i < n {
                (*held)[j] = load(base + i) * s - stats.x - stats.y;
            }
        }
        var_ = stats.z;
    }
    return vec4<f32>(centre, scaled_rstd(var_, s), s);
}

// The (shift, mean_d, var) of the row at `base` scaled by `s`, each pass reading the row again.
// Every thread of the workgroup must call it (it has barriers).
fn looped_stats(inv: Invocation, base: u32, s: f32) -> vec3<f32> {
    let n = params.features / W;
    let count = f32(params.features);
#ifdef RMS
    let shift = 0.0;
    let mean_d = 0.0;
#else
    let shift = scaled_shift(first(load(base)), s);
    var sum = 0.0;
    for (var i = inv.lid; i < n; i += WG) {
        sum += hsum(load(base + i) * s - shift);
    }
    let mean_d = workgroup_sum(inv, sum) / count;
#endif

    var sq = 0.0;
    for (var i = inv.lid; i < n; i += WG) {
        let c = load(base + i) * s - shift - mean_d;
        sq += hsum(c * c);
    }
    return vec3<f32>(shift, mean_d, workgroup_sum(inv, sq) / count);
}

// The statistics of the row at `base` by the whole workgroup, each pass reading the row again:
// (shift, mean_d, rstd, s), where s is the power of two the row was scaled by (1 for rows in
// range) and the others are those of the scaled row, so its centred values are x * s - shift -
// mean_d. Every thread of the workgroup must call it (it has barriers).
fn looped_moments(inv: Invocation, base: u32) -> vec4<f32> {
    let n = params.features / W;
    let count = f32(params.features);

#ifdef RMS
    let shift = 0.0;
    let mean_d = 0.0;
    var sq = 0.0;
    var big = false;
    for (var i = inv.lid; i < n; i += WG) {
        let v = load(base + i);
        sq += hsum(v * v);
        big = big || too_big(v);
    }
    let total = workgroup_sum(inv, flagged(sq, big));
    let var_ = total / count;
#else
    let shift = first(load(base));
    var sum = 0.0;
    var big = abs(shift) > BIG_SHIFT;
    for (var i = inv.lid; i < n; i += WG) {
        let d = load(base + i) - shift;
        sum += hsum(d);
        big = big || too_big(d);
    }
    let total = workgroup_sum(inv, flagged(sum, big));
    let mean_d = total / count;

    var sq = 0.0;
    for (var i = inv.lid; i < n; i += WG) {
        let c = load(base + i) - shift - mean_d;
        sq += hsum(c * c);
    }
    let var_ = workgroup_sum(inv, sq) / count;
#endif

    // Every thread has the same sums (uniform), so all take the same branch, and the rare
    // path's sums (with barriers) run in uniform control flow.
    let s = rescale(total, var_);
    if s != 1.0 {
        let stats = looped_stats(inv, base, s);
        return vec4<f32>(stats.x, stats.y, scaled_rstd(stats.z, s), s);
    }
    return vec4<f32>(shift, mean_d, inverseSqrt(var_ + params.eps), 1.0);
}

@compute @workgroup_size(WG)
fn layer_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    inv: Invocation,
) {
    let row = wid.y * groups.x + wid.x;
    if row >= params.rows {
        return;
    }
    let n = params.features / W;
    let base = row * n;
    let m = looped_moments(inv, base);
#ifdef SAVE
    if inv.lid == 0u {
        row_moments[row] = m;
    }
#endif
    // x * 1.0 is x exactly: rows in range get the bits they always had.
    for (var i = inv.lid; i < n; i += WG) {
        let v = load(base + i);
#ifdef ADD
        sum_out[base + i] = pack(v);
#endif
        store(base, i, v * m.w - m.x - m.y, m.z);
    }
}

// ---- Backward -----------------------------------------------------------------------------
//
// dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd per row, with g = dy * gamma and xhat the
// normalized x (RMSNorm: no mean(g) term, xhat = x * rrms); dgamma and dbeta sum dy * xhat and dy
// over the rows. Three kernels, recorded in one pass:
// - `layer_norm_backward`: one workgroup per row (the looped forward's statistics, then the two
//   sums), writes dx into `y` and the row's moments into `row_moments`; or
//   `layer_norm_backward_held`, the same with rows held in registers, several a workgroup; or
//   `layer_norm_backward_fused`, held rows a tile at a time that also write the tile's column
//   partials, in place of the next kernel;
// - `layer_norm_backward_columns`: each thread one column (a vec4 of them with VEC4) over a tile
//   of TILE_ROWS rows, into `partials`;
// - `layer_norm_backward_merge`: each thread one column, adding the tiles' partials in order, in
//   blocks of 32, into `grads` (or onto it, for the host's later chunks: FLAG_ACCUMULATE).
// No atomics: every sum has a fixed order, so gradients repeat bit for bit.

// Rows of one tile of column sums, and tiles of one block of the merge.
const TILE_ROWS: u32 = 64u;
const MERGE_BLOCK: u32 = 32u;

@group(0) @binding(5) var<storage, read> dy: array<E>;
// (shift, mean_d, rstd, s) of each row, as `looped_moments` gives them.
@group(0) @binding(6) var<storage, read_write> row_moments: array<vec4<f32>>;
// Per tile of rows: dgamma's partial for each column, then dbeta's.
@group(0) @binding(7) var<storage, read_write> partials: array<V>;
// dgamma for each column, then dbeta.
@group(0) @binding(8) var<storage, read_write> grads: array<V>;

fn gamma_at(i: u32) -> V {
    if (params.flags & FLAG_GAMMA) != 0u {
        return gamma[i];
    }
    return V(1.0);
}

@compute @workgroup_size(WG)
fn layer_norm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    inv: Invocation,
) {
    let row = wid.y * groups.x + wid.x;
    if row >= params.rows {
        return;
    }
    let n = params.features / W;
    let base = row * n;
    let count = f32(params.features);
#ifdef SAVED
    let m = row_moments[row];
#else
    let m = looped_moments(inv, base);
#endif

    var sg = 0.0;
    var sgx = 0.0;
    for (var i = inv.lid; i < n; i += WG) {
        let h = (unpack(x[base + i]) * m.w - m.x - m.y) * m.z;
        let g = unpack(dy[base + i]) * gamma_at(i);
        sg += hsum(g);
        sgx += hsum(g * h);
    }
#ifdef RMS
    let mean_g = 0.0;
#else
    let mean_g = workgroup_sum(inv, sg) / count;
#endif
    let mean_gx = workgroup_sum(inv, sgx) / count;
    // The rstd of the unscaled row: that of the row scaled by s, times s.
    let rstd = m.z * m.w;
    for (var i = inv.lid; i < n; i += WG) {
        let h = (unpack(x[base + i]) * m.w - m.x - m.y) * m.z;
        let g = unpack(dy[base + i]) * gamma_at(i);
        y[base + i] = pack((g - mean_g - h * mean_gx) * rstd);
    }
#ifndef SAVED
    if inv.lid == 0u {
        row_moments[row] = m;
    }
#endif
}

// `layer_norm_backward` for rows held in registers, as `layer_norm_held` holds them: T threads
// a row, K values each of x and of dy, several rows a workgroup; x and dy are read once.
@compute @workgroup_size(WG)
fn layer_norm_backward_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    inv: Invocation,
) {
    let first_row = (wid.y * groups.x + wid.x) * (WG / T);
    if first_row >= params.rows {
        return;
    }
    let row = first_row + inv.lid / T;
    var held: array<V, K>;
    var d: array<V, K>;
    backward_held_row(inv, row, row < params.rows, &held, &d);
}

// `layer_norm_backward_held` with one row a workgroup (T == WG), taking the TILE_ROWS rows of one
// tile in turn and adding each row's dy * xhat and dy for its columns, in the order and with the
// values `layer_norm_backward_columns` adds them: the tile's partials come from here, and x and
// dy are read once in all.
@compute @workgroup_size(WG)
fn layer_norm_backward_fused(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    inv: Invocation,
) {
    let tile = wid.y * groups.x + wid.x;
    if tile >= (params.rows + TILE_ROWS - 1u) / TILE_ROWS {
        return;
    }
    let n = params.features / W;
    var held: array<V, K>;
    var d: array<V, K>;
    var dg: array<V, K>;
    var db: array<V, K>;
    for (var row = tile * TILE_ROWS; row < min(tile * TILE_ROWS + TILE_ROWS, params.rows); row++) {
        backward_held_row(inv, row, true, &held, &d);
        for (var j = 0u; j < K; j++) {
            if inv.lid + j * T < n {
                dg[j] += d[j] * held[j];
                db[j] += d[j];
            }
        }
    }
    for (var j = 0u; j < K; j++) {
        let i = inv.lid + j * T;
        if i < n {
            partials[tile * 2u * n + i] = dg[j];
            partials[tile * 2u * n + n + i] = db[j];
        }
    }
}

// The backward of the row `row` (past the end where not `live`), T threads a row, this thread's
// elements lane + j * T: loads x and dy into `held` and `d`, writes dx and (unless SAVED) the
// row's moments, and leaves xhat in `held`. Every thread of the workgroup must call it (it has
// barriers).
fn backward_held_row(
    inv: Invocation,
    row: u32,
    live: bool,
    held: ptr<function, array<V, K>>,
    d: ptr<function, array<V, K>>,
) {
    let lane = inv.lid % T;
    let n = params.features / W;
    let base = row * n;
    let count = f32(params.features);
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            (*held)[j] = unpack(x[base + i]);
            (*d)[j] = unpack(dy[base + i]);
        }
    }
#ifdef SAVED
    var m = vec4<f32>(0.0, 0.0, 1.0, 1.0);
    if live {
        m = row_moments[row];
    }
    for (var j = 0u; j < K; j++) {
        (*held)[j] = (*held)[j] * m.w - m.x - m.y;
    }
#else
    let m = held_moments(inv, base, live, held);
#endif
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            (*held)[j] = (*held)[j] * m.z;
            let g = (*d)[j] * gamma_at(i);
            sg += hsum(g);
            sgx += hsum(g * (*held)[j]);
        }
    }
#ifdef RMS
    let mean_g = 0.0;
#else
    let mean_g = row_sum(inv, sg) / count;
#endif
    let mean_gx = row_sum(inv, sgx) / count;
    let rstd = m.z * m.w;
    for (var j = 0u; j < K; j++) {
        let i = lane + j * T;
        if live && i < n {
            let g = (*d)[j] * gamma_at(i);
            y[base + i] = pack((g - mean_g - (*held)[j] * mean_gx) * rstd);
        }
    }
#ifndef SAVED
    if live && lane == 0u {
        row_moments[row] = m;
    }
#endif
}

@compute @workgroup_size(WG)
fn layer_norm_backward_columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = params.features / W;
    let blocks = (n + WG - 1u) / WG;
    let tiles = (params.rows + TILE_ROWS - 1u) / TILE_ROWS;
    let group = wid.y * groups.x + wid.x;
    let tile = group / blocks;
    let i = (group % blocks) * WG + lid;
    if tile >= tiles || i >= n {
        return;
    }
    var dg = V(0.0);
    var db = V(0.0);
    for (var r = tile * TILE_ROWS; r < min(tile * TILE_ROWS + TILE_ROWS, params.rows); r++) {
        let m = row_moments[r];
        let h = (unpack(x[r * n + i]) * m.w - m.x - m.y) * m.z;
        let d = unpack(dy[r * n + i]);
        dg += d * h;
        db += d;
    }
    partials[tile * 2u * n + i] = dg;
    partials[tile * 2u * n + n + i] = db;
}

@compute @workgroup_size(WG)
fn layer_norm_backward_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = params.features / W;
    let i = (wid.y * groups.x + wid.x) * WG + lid;
    if i >= n {
        return;
    }
    let tiles = (params.rows + TILE_ROWS - 1u) / TILE_ROWS;
    // Two levels, blocks of MERGE_BLOCK tiles and then the blocks, in order: the rounding
    // error grows with MERGE_BLOCK + tiles / MERGE_BLOCK additions, not with every tile.
    var dg = V(0.0);
    var db = V(0.0);
    for (var t0 = 0u; t0 < tiles; t0 += MERGE_BLOCK) {
        var bg = V(0.0);
        var bb = V(0.0);
        for (var t = t0; t < min(t0 + MERGE_BLOCK, tiles); t++) {
            bg += partials[t * 2u * n + i];
            bb += partials[t * 2u * n + n + i];
        }
        dg += bg;
        db += bb;
    }
    if (params.flags & FLAG_ACCUMULATE) != 0u {
        dg += grads[i];
        db += grads[n + i];
    }
    grads[i] = dg;
    grads[n + i] = db;
}
