// BatchNorm: per-channel statistics over every counted position, then one elementwise pass.
//
// The tensor is [batch, channels, spatial]: element (position p, channel c) sits at
// ((p / spatial) * channels + c) * spatial + p % spatial, with p = n * spatial + s. Features-last
// [rows, features] is the case spatial = 1 (positions are rows, channels are features).
//
// Algorithm, deterministic and accurate on offset columns:
//   stats_seed:    one thread per column starts its statistics, columns[c] = (shift, 0, 0, 0),
//                  with the shift the median of its values at the first three counted positions
//                  (`first`, `seed_b`, `seed_c`, in the chunk that holds the first; exact for
//                  offset data).
//   stats_partial: one workgroup per (column tile, row tile); threads are laid out as
//                  tile_cols x tile_rows (adjacent threads on adjacent columns for features-last,
//                  all threads on one channel for channels-first). A two-pass over the tile's
//                  shifted values gives (count, mean_d, M2).
//   stats_merge:   several threads per column merge the chunk's row tiles, in a fixed order,
//                  into its running (shift, mean_d, M2, count) with Chan's formula. No atomics.
// A tensor larger than one binding streams through in chunks of whole rows (or batch items):
// stats_partial and stats_merge run once per chunk, so only one chunk's tiles exist at a time. A
// tensor too wide for one binding of per-column statistics runs in blocks of columns (Params
// stride and col_base): `channels` and every columns/partials index are the block's.
//   apply:         y = ((x - shift) - mean_d) * inverseSqrt(M2 / count + eps) * gamma + beta,
//                  one thread per (position, column of the block);
//                  masked positions are written as 0. Eval mode runs only this pass, with
//                  (0, running_mean, running_var, 1) per column. Where four neighbouring values
//                  share a position (features-last, channels % 4 == 0) or a channel
//                  (channels-first, spatial % 4 == 0), batch_norm_apply4.wgsl does the same four
//                  at a time, with the same bits.
//   running_update: one thread per column folds the batch statistics into running statistics
//                  kept on the device, (0, mean, unbiased var, 1) per column (the layout eval
//                  reads): new = (1 - momentum) * old + momentum * batch.
//
// Every entry point runs WG threads per workgroup. Workgroups beyond the grid's first side use its
// y dimension.

#import gpunorm::common::{WG, FLAG_GAMMA, FLAG_BETA, FLAG_MASK}
#import gpunorm::batch_norm_params::Params

// One value per thread, for the column sums.
var<workgroup> partial: array<f32, WG>;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
// Per (row tile of this chunk, column): (count, mean_d, M2, 0).
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;
// Per column c: columns[c] = (shift, mean_d, M2, count), the running statistics (training), or
// (0, running mean, running var, 1) written by the host (eval); and
// columns[channels + c] = (gamma, beta, 0, 0), written by the host. (Gamma and beta ride here so
// that no kernel binds more than 4 storage buffers, the least a device may offer.)
@group(0) @binding(4) var<storage, read_write> columns: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// Running statistics on the device, (0, mean, unbiased var, 1) per column of the whole tensor.
@group(0) @binding(7) var<storage, read_write> running: array<vec4<f32>>;

// Where (position p, column c of the block) sits in x and y.
fn index_of(p: u32, c: u32) -> u32 {
    let s = params.spatial;
    return ((p / s) * params.stride + params.col_base + c) * s + p % s;
}

// The (position, column of the block) of element e in the order of x (apply, backward_apply).
struct Element {
    position: u32,
    column: u32,
}

fn element_of(e: u32) -> Element {
    let plane = params.spatial * params.channels;
    let column = (e % plane) / params.spatial;
    return Element((e / plane) * params.spatial + e % params.spatial, column);
}

// 1 / sqrt(var + eps) of a column's (shift, mean_d, M2, count).
fn rstd_of(st: vec4<f32>) -> f32 {
    return inverseSqrt(st.z / st.w + params.eps);
}

fn counted(p: u32) -> bool {
    return (params.flags & FLAG_MASK) == 0u || mask[p] != 0u;
}

// Sum of `value` over the tile_rows threads that share this thread's column, in a fixed tree
// order. lid = tr * tile_cols + tc; tile_rows is a power of two. Every thread must call it.
fn column_sum(lid: u32, value: f32) -> f32 {
    let tc = lid % params.tile_cols;
    let tr = lid / params.tile_cols;
    partial[lid] = value;
    workgroupBarrier();
    for (var stride = params.tile_rows / 2u; stride > 0u; stride = stride / 2u) {
        if tr < stride {
            partial[lid] = partial[lid] + partial[lid + stride * params.tile_cols];
        }
        workgroupBarrier();
    }
    let total = partial[tc];
    workgroupBarrier();
    return total;
}

// Where one thread of a (column tile, row tile) workgroup works (stats_partial and
// backward_partial): its column, its row within the tile (threads are tile_cols x tile_rows), and
// the tile's positions [begin, end).
struct Tile {
    column: u32,
    row: u32,
    row_tile: u32,
    begin: u32,
    end: u32,
}

fn tile_of(group: u32, lid: u32) -> Tile {
    let row_tile = group / params.col_tiles;
    let begin = row_tile * params.rows_per_tile;
    return Tile(
        (group % params.col_tiles) * params.tile_cols + lid % params.tile_cols,
        lid / params.tile_cols,
        row_tile,
        begin,
        min(begin + params.rows_per_tile, params.positions),
    );
}

@compute @workgroup_size(WG)
fn stats_seed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c < params.channels {
        seed(c, vec3<u32>(params.first, params.seed_b, params.seed_c));
    }
}

// Starts column c's statistics with the median of its values at positions `at`: the mean's f32
// rounding is one of mean − shift, so a shift near the mean keeps it small where the first
// counted value alone lies far out (a column whose first position carries a large activation).
fn seed(c: u32, at: vec3<u32>) {
    let a = x[index_of(at.x, c)];
    let b = x[index_of(at.y, c)];
    let d = x[index_of(at.z, c)];
    columns[c] = vec4<f32>(max(min(a, b), min(max(a, b), d)), 0.0, 0.0, 0.0);
}

// stats_seed where the mask lives on the device (a tensor recorded into a caller's encoder, one
// chunk): each column's thread finds the first three counted positions itself. Padding mostly
// trails a sequence, so the walk is short, and every thread reads the same mask words. Missing
// ones repeat the first, as the host's seeds do; with none counted, position 0 (its statistics
// count nothing).
@compute @workgroup_size(WG)
fn stats_seed_scan(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c >= params.channels {
        return;
    }
    var at = vec3<u32>(0u);
    var found = 0u;
    for (var p = 0u; p < params.positions && found < 3u; p++) {
        if counted(p) {
            at[found] = p;
            found++;
        }
    }
    if found < 2u {
        at.y = at.x;
    }
    if found < 3u {
        at.z = at.x;
    }
    seed(c, at);
}

@compute @workgroup_size(WG)
fn stats_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.y * groups.x + wid.x;
    if group >= params.col_tiles * params.row_tiles {
        return;
    }
    let t = tile_of(group, lid);
    let c = t.column;
    let live = c < params.channels;

    var shift = 0.0;
    if live {
        shift = columns[c].x;
    }
    var count = 0.0;
    var sum = 0.0;
    if live {
        for (var p = t.begin + t.row; p < t.end; p += params.tile_rows) {
            if counted(p) {
                sum += x[index_of(p, c)] - shift;
                count += 1.0;
            }
        }
    }
    let n = column_sum(lid, count);
    let mean_d = select(0.0, column_sum(lid, sum) / n, n > 0.0);

    var sq = 0.0;
    if live {
        for (var p = t.begin + t.row; p < t.end; p += params.tile_rows) {
            if counted(p) {
                let d = x[index_of(p, c)] - shift - mean_d;
                sq += d * d;
            }
        }
    }
    let m2 = column_sum(lid, sq);
    if live && t.row == 0u {
        partials[t.row_tile * params.channels + c] = vec4<f32>(n, mean_d, m2, 0.0);
    }
}

// Chan et al.: (n, mean, M2) of a merged with q. An empty q leaves a as it is; an empty a takes
// q's values exactly.
fn chan(a: vec3<f32>, q: vec3<f32>) -> vec3<f32> {
    if q.x <= 0.0 {
        return a;
    }
    let total = a.x + q.x;
    let delta = q.y - a.y;
    return vec3<f32>(
        total,
        a.y + delta * (q.x / total),
        a.z + (q.z + delta * delta * (a.x * q.x / total)),
    );
}

// Columns one workgroup of stats_merge merges: the channels rounded up to a power of two, at
// most 32 (a subgroup's worth of adjacent partials per row tile).
fn merge_columns() -> u32 {
    if params.channels >= 32u {
        return 32u;
    }
    return 1u << (32u - countLeadingZeros(max(params.channels, 1u) - 1u));
}

// (n, mean, M2) of each thread's row tiles, for stats_merge.
var<workgroup> merged: array<vec4<f32>, WG>;

// WG / merge_columns() threads per column: thread j merges row tiles j, j + WG / lanes, ... in
// order, then one thread merges those results, j = 0, 1, ..., into the running statistics. A
// fixed order, so the bits repeat, and a serial chain WG / lanes times shorter than one thread
// per column walking every tile.
@compute @workgroup_size(WG)
fn stats_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lanes = merge_columns();
    let threads = WG / lanes;
    let first = (wid.y * groups.x + wid.x) * lanes;
    if first >= params.channels {
        return;
    }
    let c = first + lid % lanes;
    let live = c < params.channels;
    var acc = vec3<f32>(0.0);
    if live {
        for (var t = lid / lanes; t < params.row_tiles; t += threads) {
            acc = chan(acc, partials[t * params.channels + c].xyz);
        }
    }
    merged[lid] = vec4<f32>(acc, 0.0);
    workgroupBarrier();
    if live && lid < lanes {
        let start = columns[c];
        var run = start.wyz;
        for (var j = 0u; j < threads; j++) {
            run = chan(run, merged[j * lanes + lid].xyz);
        }
        columns[c] = vec4<f32>(start.x, run.y, run.z, run.x);
    }
}

@compute @workgroup_size(WG)
fn apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * WG + lid;
    if e >= params.positions * params.channels {
        return;
    }
    let el = element_of(e);
    let c = el.column;
    let i = index_of(el.position, c);
    if !counted(el.position) {
        y[i] = 0.0;
        return;
    }
    let st = columns[c];
    var v = ((x[i] - st.x) - st.y) * rstd_of(st);
    if (params.flags & (FLAG_GAMMA | FLAG_BETA)) != 0u {
        let affine = columns[params.channels + c];
        if (params.flags & FLAG_GAMMA) != 0u {
            v = v * affine.x;
        }
        if (params.flags & FLAG_BETA) != 0u {
            v = v + affine.y;
        }
    }
    y[i] = v;
}

// ---- Backward (training) -----------------------------------------------------------------
//
// With the statistics of the forward (the passes above, run again on x) and xhat = (x - mean) *
// rstd: dbeta = Σ dy and dgamma = Σ dy * xhat over the counted positions, and
// dx = gamma * rstd * (dy - dbeta / N - xhat * dgamma / N) on them, 0 on masked ones. Masked
// positions are skipped, never multiplied by 0, so whatever they hold changes nothing else.
//   backward_partial: per (column tile, row tile) as stats_partial, (Σ dy, Σ dy * xhat) into
//                     partials[row tile, c].xy;
//   backward_merge:   one thread per column adds the chunk's row tiles, in order and in blocks
//                     of 32, onto columns[channels + c].zw (zeroed by the host first);
//   backward_apply:   dx, one thread per (position, column), as apply.

@group(0) @binding(6) var<storage, read> dy: array<f32>;

@compute @workgroup_size(WG)
fn backward_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.y * groups.x + wid.x;
    if group >= params.col_tiles * params.row_tiles {
        return;
    }
    let t = tile_of(group, lid);
    let c = t.column;
    let live = c < params.channels;

    var s1 = 0.0;
    var s2 = 0.0;
    if live {
        let st = columns[c];
        let r = rstd_of(st);
        for (var p = t.begin + t.row; p < t.end; p += params.tile_rows) {
            if counted(p) {
                let i = index_of(p, c);
                let d = dy[i];
                s1 += d;
                s2 += d * (((x[i] - st.x) - st.y) * r);
            }
        }
    }
    let t1 = column_sum(lid, s1);
    let t2 = column_sum(lid, s2);
    if live && t.row == 0u {
        partials[t.row_tile * params.channels + c] = vec4<f32>(t1, t2, 0.0, 0.0);
    }
}

@compute @workgroup_size(WG)
fn backward_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c >= params.channels {
        return;
    }
    let affine = columns[params.channels + c];
    // In blocks of 32 tiles, then the blocks, in order: the rounding error grows with 32 plus
    // the number of blocks, not with every tile.
    var acc = vec2<f32>(0.0);
    for (var t0 = 0u; t0 < params.row_tiles; t0 += 32u) {
        var block = vec2<f32>(0.0);
        for (var t = t0; t < min(t0 + 32u, params.row_tiles); t++) {
            block += partials[t * params.channels + c].xy;
        }
        acc += block;
    }
    columns[params.channels + c] = vec4<f32>(affine.xy, affine.zw + acc);
}

@compute @workgroup_size(WG)
fn backward_apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * WG + lid;
    if e >= params.positions * params.channels {
        return;
    }
    let el = element_of(e);
    let c = el.column;
    let i = index_of(el.position, c);
    if !counted(el.position) {
        y[i] = 0.0;
        return;
    }
    let st = columns[c];
    let r = rstd_of(st);
    let affine = columns[params.channels + c];
    var g = r;
    if (params.flags & FLAG_GAMMA) != 0u {
        g = g * affine.x;
    }
    let h = ((x[i] - st.x) - st.y) * r;
    y[i] = g * ((dy[i] - affine.z / st.w) - h * (affine.w / st.w));
}

// The running statistics (mean, unbiased var) `old` with a batch's (shift, mean_d, M2, count)
// folded in: new = (1 - momentum) * old + momentum * batch. A batch that counts fewer than two
// positions has no unbiased variance and leaves them as they were, as the host's update refuses
// it.
fn folded(old: vec2<f32>, st: vec4<f32>) -> vec2<f32> {
    if st.w < 2.0 {
        return old;
    }
    let m = params.momentum;
    return (1.0 - m) * old + m * vec2<f32>(st.x + st.y, st.z / (st.w - 1.0));
}

@compute @workgroup_size(WG)
fn running_update(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c >= params.channels {
        return;
    }
    let old = running[params.col_base + c];
    running[params.col_base + c] = vec4<f32>(0.0, folded(old.yz, columns[c]), 1.0);
}

// ---- Per-feature values of a caller's buffers (Normalizer::encode) -------------------------
//
// A BatchNorm recorded into a caller's encoder runs on one chunk and one block of columns. Its
// per-feature values travel side by side in `pairs`, copied from and to the caller's buffers
// around the kernels: `a` in pairs[c] and `b` in pairs[channels + c], for each column c.
//   pack_affine:    (a, b) = (gamma, beta), as flags say which are given, into columns[channels
//                   + c] = (gamma or 1, beta or 0, 0, 0): the backward sums start at 0 there;
//   pack_running:   (a, b) = (running mean, running var) into columns[c] for eval;
//   fold_running:   the batch statistics folded into (a, b) = (running mean, running var);
//   unpack_grads:   (a, b) = (dgamma, dbeta) from the backward sums.

@group(0) @binding(8) var<storage, read_write> pairs: array<f32>;

@compute @workgroup_size(WG)
fn pack_affine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c >= params.channels {
        return;
    }
    var affine = vec4<f32>(1.0, 0.0, 0.0, 0.0);
    if (params.flags & FLAG_GAMMA) != 0u {
        affine.x = pairs[c];
    }
    if (params.flags & FLAG_BETA) != 0u {
        affine.y = pairs[params.channels + c];
    }
    columns[params.channels + c] = affine;
}

@compute @workgroup_size(WG)
fn pack_running(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c < params.channels {
        columns[c] = vec4<f32>(0.0, pairs[c], pairs[params.channels + c], 1.0);
    }
}

@compute @workgroup_size(WG)
fn fold_running(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c >= params.channels {
        return;
    }
    let next = folded(vec2<f32>(pairs[c], pairs[params.channels + c]), columns[c]);
    pairs[c] = next.x;
    pairs[params.channels + c] = next.y;
}

@compute @workgroup_size(WG)
fn unpack_grads(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.y * groups.x + wid.x) * WG + lid;
    if c < params.channels {
        let sums = columns[params.channels + c];
        pairs[c] = sums.w;
        pairs[params.channels + c] = sums.z;
    }
}
