// Element type for rows whose length is a multiple of 4: every load and store moves 16 bytes.
// Prepended to an op's shader by the host; keep in sync with shared/scalar.wgsl.
alias V = vec4<f32>;
const W: u32 = 4u;

fn hsum(v: V) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn first(v: V) -> f32 {
    return v.x;
}
