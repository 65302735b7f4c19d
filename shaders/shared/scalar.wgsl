// Element type for rows of any length: one f32 per load and store.
// Prepended to an op's shader by the host; keep in sync with shared/vec4.wgsl.
alias V = f32;
const W: u32 = 1u;

fn hsum(v: V) -> f32 {
    return v;
}

fn first(v: V) -> f32 {
    return v;
}
