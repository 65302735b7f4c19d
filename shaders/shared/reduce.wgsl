// Workgroup-wide sum through shared memory, in a fixed tree order, so the result is bitwise
// reproducible. WG (the workgroup size, a power of two) is defined by the host before this file.
// Every thread of the workgroup must call `workgroup_sum` (it has barriers).
// Keep `Invocation` and `workgroup_sum` in step with shared/reduce_subgroup.wgsl.

var<workgroup> partial: array<f32, WG>;

// What an entry point receives about its thread; the reduction needs only its index.
struct Invocation {
    @builtin(local_invocation_index) lid: u32,
}

fn workgroup_sum(inv: Invocation, value: f32) -> f32 {
    let lid = inv.lid;
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
