// Workgroup-wide sum with subgroup operations, for devices with `Features::SUBGROUP`: each
// subgroup adds its values in registers, then every thread adds the subgroups' sums in subgroup
// order. Two barriers instead of log2(WG) + 2. The subgroup sum's order is fixed by the hardware,
// so repeated runs on one device give identical bits. WG is defined by the host before this file.
// Every thread of the workgroup must call `workgroup_sum` (it has barriers).
// Keep `Invocation` and `workgroup_sum` in step with shared/reduce.wgsl.

// One sum per subgroup (room for subgroups of a single thread).
var<workgroup> partial: array<f32, WG>;

struct Invocation {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
}

fn workgroup_sum(inv: Invocation, value: f32) -> f32 {
    let sum = subgroupAdd(value);
    if inv.lane == 0u {
        partial[inv.subgroup] = sum;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var s = 0u; s < inv.subgroups; s++) {
        total += partial[s];
    }
    // Nobody may overwrite a partial for the next reduction before everyone has read them all.
    workgroupBarrier();
    return total;
}
