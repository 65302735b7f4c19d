// What every gpunorm kernel shares: its workgroup size and the bits of `Params.flags`. The host
// supplies the values (src/gpu/shaders.rs), so each number is written once, in Rust.
#define_import_path gpunorm::common

// Threads per workgroup.
const WG: u32 = #{WG}u;

// Params.flags: multiply by gamma; add beta; read the mask (BatchNorm); add onto the gradients
// of earlier chunks (LayerNorm backward).
const FLAG_GAMMA: u32 = #{FLAG_GAMMA}u;
const FLAG_BETA: u32 = #{FLAG_BETA}u;
const FLAG_MASK: u32 = #{FLAG_MASK}u;
const FLAG_ACCUMULATE: u32 = #{FLAG_ACCUMULATE}u;
