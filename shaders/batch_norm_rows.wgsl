// BatchNorm of features-last tensors four columns wide at a time ([rows, features] with
// features % 4 == 0: the transformer and MLP case). The same statistics partials and elementwise
// pass as batch_norm.wgsl, with every thread on one vec4 of columns for a run of rows: loads and
// stores move 16 bytes, no index needs a division, and `apply_rows` reads each column's
// statistics once per thread, not once per value.
//
// Tiles: a workgroup is tile_cols (vec4 columns) x tile_rows threads, adjacent threads on
// adjacent vec4 columns, so each subgroup reads contiguous runs of a row. Row tile t covers rows
// [t * rows_per_tile, (t + 1) * rows_per_tile) of the chunk; thread row tr takes every
// tile_rows-th of them, from tr.
//   stats_partial_rows: per tile, the two-pass (count, mean_d, M2) of each column over its rows,
//                       written per column in batch_norm.wgsl's layout, for its stats_merge. The
//                       second pass reads the tile again (from cache where it is still there).
//   stats_partial_held: the same for tiles of at most K rows per thread, each thread keeping its
//                       rows in registers, so the tile is read from memory once.
//   apply_rows:         per tile, y = ((x - shift) - mean_d) * inverseSqrt(M2 / count + eps)
//                       * gamma + beta, each lane as batch_norm.wgsl's `apply` computes it;
//                       masked rows are written as 0.

#import gpunorm::common::{WG, FLAG_GAMMA, FLAG_BETA, FLAG_MASK}
#import gpunorm::batch_norm_params::Params

// Shader def (src/gpu/batch_norm.rs picks it): rows each thread of stats_partial_held keeps, at
// most 32; rows_per_tile is then at most tile_rows * K.
const K: u32 = #{K}u;

// One vec4 per thread, for the column sums.
var<workgroup> partial: array<vec4<f32>, WG>;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
// Per (row tile of this chunk, column): (count, mean_d, M2, 0).
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;
// Per column c: columns[c] = (shift, mean_d, M2, count) and columns[channels + c] =
// (gamma, beta, 0, 0), as in batch_norm.wgsl.
@group(0) @binding(4) var<storage, read> columns: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>;

fn counted(p: u32) -> bool {
    return (params.flags & FLAG_MASK) == 0u || mask[p] != 0u;
}

// Lane k of the result is component `pick` of columns[first + k]: the four columns a thread
// covers, one field each.
fn gather(first: u32, pick: u32) -> vec4<f32> {
    return vec4<f32>(
        columns[first][pick],
        columns[first + 1u][pick],
        columns[first + 2u][pick],
        columns[first + 3u][pick],
    );
}

// Sum of `value` over the tile_rows threads that share this thread's vec4 column, in a fixed
// tree order. Every thread must call it (it has barriers).
fn column_sum(lid: u32, value: vec4<f32>) -> vec4<f32> {
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

// The vec4 index in x and y of row p's vec4 column `column` of the block: x and y hold whole
// rows of the tensor (`stride` columns), and the block starts at column col_base (both are
// multiples of 4).
fn vec4_index(p: u32, column: u32) -> u32 {
    return p * (params.stride / 4u) + params.col_base / 4u + column;
}

// This thread's place: (vec4 column, first row, end of its tile's rows), or a column past the
// end. Tiles are numbered column tile fastest.
struct Place {
    column: u32,
    live: bool,
    begin: u32,
    end: u32,
}

fn place(group: u32, lid: u32) -> Place {
    let col_tile = group % params.col_tiles;
    let row_tile = group / params.col_tiles;
    let column = col_tile * params.tile_cols + lid % params.tile_cols;
    let start = row_tile * params.rows_per_tile;
    return Place(
        column,
        column < params.channels / 4u,
        start + lid / params.tile_cols,
        min(start + params.rows_per_tile, params.positions),
    );
}

// The shift of this thread's four columns (seeded by `stats_seed`).
fn shift_of(at: Place) -> vec4<f32> {
    if at.live {
        return gather(4u * at.column, 0u);
    }
    return vec4<f32>(0.0);
}

// Writes a tile's (count, mean_d, M2) per column, from the threads of its first row.
fn store_partials(group: u32, lid: u32, at: Place, n: f32, mean_d: vec4<f32>, m2: vec4<f32>) {
    if at.live && lid < params.tile_cols {
        let out = (group / params.col_tiles) * params.channels + 4u * at.column;
        for (var k = 0u; k < 4u; k++) {
            partials[out + k] = vec4<f32>(n, mean_d[k], m2[k], 0.0);
        }
    }
}

@compute @workgroup_size(WG)
fn stats_partial_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.y * groups.x + wid.x;
    if group >= params.col_tiles * params.row_tiles {
        return;
    }
    let at = place(group, lid);
    let shift = shift_of(at);
    var count = 0.0;
    var sum = vec4<f32>(0.0);
    if at.live {
        for (var p = at.begin; p < at.end; p += params.tile_rows) {
            if counted(p) {
                sum += x[vec4_index(p, at.column)] - shift;
                count += 1.0;
            }
        }
    }
    let n = column_sum(lid, vec4<f32>(count)).x;
    let mean_d = select(vec4<f32>(0.0), column_sum(lid, sum) / n, n > 0.0);

    var sq = vec4<f32>(0.0);
    if at.live {
        for (var p = at.begin; p < at.end; p += params.tile_rows) {
            if counted(p) {
                let d = x[vec4_index(p, at.column)] - shift - mean_d;
                sq += d * d;
            }
        }
    }
    store_partials(group, lid, at, n, mean_d, column_sum(lid, sq));
}

@compute @workgroup_size(WG)
fn stats_partial_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.y * groups.x + wid.x;
    if group >= params.col_tiles * params.row_tiles {
        return;
    }
    let at = place(group, lid);
    let shift = shift_of(at);
    // All K loads are issued before any arithmetic waits on them; bit j of `kept` marks a
    // counted row.
    var held: array<vec4<f32>, K>;
    var kept = 0u;
    for (var j = 0u; j < K; j++) {
        let p = at.begin + j * params.tile_rows;
        if at.live && p < at.end && counted(p) {
            held[j] = x[vec4_index(p, at.column)];
            kept |= 1u << j;
        }
    }
    var count = 0.0;
    var sum = vec4<f32>(0.0);
    for (var j = 0u; j < K; j++) {
        if (kept & (1u << j)) != 0u {
            held[j] = held[j] - shift;
            sum += held[j];
            count += 1.0;
        }
    }
    let n = column_sum(lid, vec4<f32>(count)).x;
    let mean_d = select(vec4<f32>(0.0), column_sum(lid, sum) / n, n > 0.0);

    var sq = vec4<f32>(0.0);
    for (var j = 0u; j < K; j++) {
        if (kept & (1u << j)) != 0u {
            let d = held[j] - mean_d;
            sq += d * d;
        }
    }
    store_partials(group, lid, at, n, mean_d, column_sum(lid, sq));
}

@compute @workgroup_size(WG)
fn apply_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.y * groups.x + wid.x;
    if group >= params.col_tiles * params.row_tiles {
        return;
    }
    let at = place(group, lid);
    if !at.live {
        return;
    }
    let first = 4u * at.column;
    let shift = gather(first, 0u);
    let mean_d = gather(first, 1u);
    let rstd = inverseSqrt(gather(first, 2u) / gather(first, 3u) + params.eps);
    let gamma = gather(params.channels + first, 0u);
    let beta = gather(params.channels + first, 1u);
    for (var p = at.begin; p < at.end; p += params.tile_rows) {
        let i = vec4_index(p, at.column);
        if !counted(p) {
            y[i] = vec4<f32>(0.0);
            continue;
        }
        var o = ((x[i] - shift) - mean_d) * rstd;
        if (params.flags & FLAG_GAMMA) != 0u {
            o = o * gamma;
        }
        if (params.flags & FLAG_BETA) != 0u {
            o = o + beta;
        }
        y[i] = o;
    }
}
