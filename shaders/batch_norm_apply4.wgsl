// BatchNorm's elementwise pass four values at a time: the `apply` of batch_norm.wgsl for tensors
// whose four neighbouring values share a position (features-last, channels % 4 == 0: four
// columns) or a channel (channels-first, spatial % 4 == 0: four positions). Each lane does the
// scalar kernel's arithmetic in the same order, so the bits are the same; one 16-byte load and
// store and one index computation serve four values.
//

#import gpunorm::common::{WG, FLAG_GAMMA, FLAG_BETA, FLAG_MASK}
#import gpunorm::batch_norm_params::Params

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
// Per column: (shift, mean_d, M2, count), then per column (gamma, beta, 0, 0), as in
// batch_norm.wgsl.
@group(0) @binding(4) var<storage, read> columns: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>;

fn counted(p: u32) -> bool {
    return (params.flags & FLAG_MASK) == 0u || mask[p] != 0u;
}

// Each lane of v normalized with its column's shift, mean_d, M2 and count, then gamma g and
// beta b.
fn normalize(
    v: vec4<f32>,
    shift: vec4<f32>,
    mean_d: vec4<f32>,
    m2: vec4<f32>,
    count: vec4<f32>,
    g: vec4<f32>,
    b: vec4<f32>,
) -> vec4<f32> {
    var o = ((v - shift) - mean_d) * inverseSqrt(m2 / count + params.eps);
    if (params.flags & FLAG_GAMMA) != 0u {
        o = o * g;
    }
    if (params.flags & FLAG_BETA) != 0u {
        o = o + b;
    }
    return o;
}

@compute @workgroup_size(WG)
fn apply4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * WG + lid;
    if e >= params.positions * params.channels / 4u {
        return;
    }
    // i: the first of the four values, counted over the block's (position, column) pairs.
    let i = e * 4u;
    if params.spatial == 1u {
        // Features-last: columns c .. c + 3 of position p.
        let c = i % params.channels;
        let p = i / params.channels;
        let m = (p * params.stride + params.col_base + c) / 4u;
        if !counted(p) {
            y[m] = vec4<f32>(0.0);
            return;
        }
        let s0 = columns[c];
        let s1 = columns[c + 1u];
        let s2 = columns[c + 2u];
        let s3 = columns[c + 3u];
        var g = vec4<f32>(1.0);
        var b = vec4<f32>(0.0);
        if (params.flags & (FLAG_GAMMA | FLAG_BETA)) != 0u {
            let a = params.channels + c;
            let a0 = columns[a];
            let a1 = columns[a + 1u];
            let a2 = columns[a + 2u];
            let a3 = columns[a + 3u];
            g = vec4<f32>(a0.x, a1.x, a2.x, a3.x);
            b = vec4<f32>(a0.y, a1.y, a2.y, a3.y);
        }
        y[m] = normalize(
            x[m],
            vec4<f32>(s0.x, s1.x, s2.x, s3.x),
            vec4<f32>(s0.y, s1.y, s2.y, s3.y),
            vec4<f32>(s0.z, s1.z, s2.z, s3.z),
            vec4<f32>(s0.w, s1.w, s2.w, s3.w),
            g,
            b,
        );
    } else {
        // Channels-first: positions p .. p + 3 of channel c.
        let plane = params.spatial * params.channels;
        let c = (i % plane) / params.spatial;
        let p = (i / plane) * params.spatial + i % params.spatial;
        let s = params.spatial;
        let m = (((p / s) * params.stride + params.col_base + c) * s + p % s) / 4u;
        let st = columns[c];
        var g = 1.0;
        var b = 0.0;
        if (params.flags & (FLAG_GAMMA | FLAG_BETA)) != 0u {
            let affine = columns[params.channels + c];
            g = affine.x;
            b = affine.y;
        }
        let o = normalize(
            x[m],
            vec4<f32>(st.x),
            vec4<f32>(st.y),
            vec4<f32>(st.z),
            vec4<f32>(st.w),
            vec4<f32>(g),
            vec4<f32>(b),
        );
        let keep = vec4<bool>(counted(p), counted(p + 1u), counted(p + 2u), counted(p + 3u));
        y[m] = select(vec4<f32>(0.0), o, keep);
    }
}
