// Half tensors to f32 and back on the device, for the ops that compute on f32 tensors: each
// thread converts one u32 word, two values (f16, or bf16 with the shader def BF16; see
// gpunorm::half). An odd count's last word holds one value; `narrow` writes 0 in its upper half,
// so no two threads ever write one word.

#import gpunorm::common::WG
#import gpunorm::half::{unpack_pair, pack_pair}

// Keep in sync with `ConvertParams` in src/gpu/convert.rs (a test compares the two).
struct Params {
    // Values (not words).
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> packed_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> wide_out: array<f32>;
@group(0) @binding(3) var<storage, read> wide_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> packed_out: array<u32>;

// The first value of this thread's word, or len where it has none.
fn first_value(wid: vec3<u32>, groups: vec3<u32>, lid: u32) -> u32 {
    let word = (wid.y * groups.x + wid.x) * WG + lid;
    return min(word, params.len / 2u + 1u) * 2u;
}

@compute @workgroup_size(WG)
fn widen(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = first_value(wid, groups, lid);
    if i >= params.len {
        return;
    }
    let v = unpack_pair(packed_in[i / 2u]);
    wide_out[i] = v.x;
    if i + 1u < params.len {
        wide_out[i + 1u] = v.y;
    }
}

@compute @workgroup_size(WG)
fn narrow(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = first_value(wid, groups, lid);
    if i >= params.len {
        return;
    }
    var upper = 0.0;
    if i + 1u < params.len {
        upper = wide_in[i + 1u];
    }
    packed_out[i / 2u] = pack_pair(vec2<f32>(wide_in[i], upper));
}
