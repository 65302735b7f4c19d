// Workgroup-wide sum of one value per thread, in a fixed order, so repeated runs give identical
// bits. Every thread of the workgroup must call `workgroup_sum` (it has barriers). The sum comes
// back through `workgroupUniformLoad`, so WGSL's uniformity analysis knows every thread has the
// same one, and a branch on it may hold barriers (Tint, the browsers' WGSL compiler, checks).
//
// With the shader def SUBGROUP (devices with `Features::SUBGROUP` and one subgroup size): each
// subgroup adds its values in registers, then thread 0 adds the subgroups' sums in subgroup
// order; two barriers. The subgroup sum's order is the hardware's, fixed on one device. Without
// it: a shared-memory tree, log2(WG) + 3 barriers, on every device.
#define_import_path gpunorm::reduce

#import gpunorm::common::WG

// One value per thread (tree), or one sum per subgroup (room for subgroups of one thread).
var<workgroup> partial: array<f32, WG>;

#ifdef SUBGROUP
// What an entry point receives about its thread; entry points take it as a parameter.
struct Invocation {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
}

// The workgroup's total, written by thread 0 and read back with workgroupUniformLoad.
var<workgroup> total_slot: f32;

fn workgroup_sum(inv: Invocation, value: f32) -> f32 {
    let sum = subgroupAdd(value);
    // Lane 0 writes each subgroup's sum: every thread of the workgroup calls this function, so
    // every lane is active here. (naga 30 has no subgroupElect.)
    if inv.lane == 0u {
        partial[inv.subgroup] = sum;
    }
    workgroupBarrier();
    if inv.lid == 0u {
        var total = 0.0;
        for (var s = 0u; s < inv.subgroups; s++) {
            total += partial[s];
        }
        total_slot = total;
    }
    // Its barrier keeps the partials and total_slot from being overwritten by the next
    // reduction before they are read: thread 0 reads the partials before it, every thread reads
    // total_slot after it, and the next writes come after the next reduction's first barrier.
    return workgroupUniformLoad(&total_slot);
}
#else
// What an entry point receives about its thread; entry points take it as a parameter.
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
    let total = workgroupUniformLoad(&partial[0]);
    // Nobody may overwrite partial[0] for the next reduction before everyone has read it.
    workgroupBarrier();
    return total;
}
#endif
