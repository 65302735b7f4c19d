// The copy ceiling for `gpunorm bench`: every thread moves vec4s from `src` to `dst` in a
// grid-stride loop. Normalization reads its input once and writes its output once, so no
// kernel of the same size can beat this on the same device.

// Keep in sync with `CopyParams` in cli/src/bench.rs.
struct Params {
    vec4s: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn copy(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let stride = groups.x * WG;
    for (var i = gid.x; i < params.vec4s; i += stride) {
        dst[i] = src[i];
    }
}
