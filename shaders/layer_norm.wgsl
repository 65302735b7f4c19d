// LayerNorm forward: y = (x - mean) / sqrt(var + eps) * gamma + beta over each row.
//
// Algorithm: one 256-thread workgroup per row; shifted two-pass statistics. Every value is first
// shifted by the row's first element, d = x - x[0], which is exact for offset data (Sterbenz), so
// the mean of d, the variance around it and the output (d - mean_d) * rstd never cancel large
// numbers in f32. A plain two-pass in f32 loses 1e-2..1e-1 on rows with mean 1e4 and spread 1e-2.
// Reductions are fixed-order trees: repeated runs give identical bits.
//
// Needs shared/{vec4,scalar}.wgsl (V, W, hsum, first) and shared/reduce.wgsl prepended.
// Limits: rows of up to 2^24 features keep f32(features) exact; a chunk's elements must fit u32
// (the host splits larger tensors). Rows beyond 65535 use the y dimension of the grid.

// Keep in sync with `LayerNormParams` in src/layer_norm.rs.
struct Params {
    rows: u32,
    features: u32,
    eps: f32,
    // bit 0: multiply by gamma; bit 1: add beta.
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read_write> y: array<V>;
@group(0) @binding(3) var<storage, read> gamma: array<V>;
@group(0) @binding(4) var<storage, read> beta: array<V>;

@compute @workgroup_size(256)
fn layer_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * groups.x + wid.x;
    if row >= params.rows {
        return;
    }
    let n = params.features / W;
    let base = row * n;
    let shift = first(x[base]);
    let count = f32(params.features);

    var sum = 0.0;
    for (var i = lid; i < n; i += WG) {
        sum += hsum(x[base + i] - shift);
    }
    let mean_d = workgroup_sum(lid, sum) / count;

    var sq = 0.0;
    for (var i = lid; i < n; i += WG) {
        let c = x[base + i] - shift - mean_d;
        sq += hsum(c * c);
    }
    let rstd = inverseSqrt(workgroup_sum(lid, sq) / count + params.eps);

    for (var i = lid; i < n; i += WG) {
        var v = (x[base + i] - shift - mean_d) * rstd;
        if (params.flags & 1u) != 0u {
            v = v * gamma[i];
        }
        if (params.flags & 2u) != 0u {
            v = v + beta[i];
        }
        y[base + i] = v;
    }
}
