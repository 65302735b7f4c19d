// Workgroup-wide sum over WG = 256 threads through shared memory, in a fixed tree order so the
// result is bitwise reproducible. Every thread of the workgroup must call it (it has barriers).

const WG: u32 = 256u;

var<workgroup> partial: array<f32, WG>;

fn workgroup_sum(lid: u32, value: f32) -> f32 {
    partial[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    // Nobody may overwrite partial[0] for the next reduction before everyone has read it.
    workgroupBarrier();
    return total;
}
