#define_import_path gpunorm::half

// Half-precision storage: two values per u32, the first in the low 16 bits. f16 by WGSL's core
// unpack2x16float / pack2x16float, which need no device feature (llvmpipe, GL and every
// Vulkan, Metal and DX12 device run them); bf16 (the shader def BF16), the upper half of an
// f32, by shifts. Values are computed in f32 and rounded once on store, to nearest even. An
// output past the type's largest finite value becomes ±Inf and NaN stays NaN: pack2x16float
// leaves both indeterminate, so those lanes are set from the f32 bits here (integer tests,
// which no fast-math assumption folds away).

fn unpack_pair(w: u32) -> vec2<f32> {
#ifdef BF16
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
#else
    return unpack2x16float(w);
#endif
}

fn pack_pair(v: vec2<f32>) -> u32 {
    let b = bitcast<vec2<u32>>(v);
    let magnitude = b & vec2<u32>(0x7fffffffu);
    let nan = magnitude > vec2<u32>(0x7f800000u);
#ifdef BF16
    // Round to nearest even on the upper 16 bits; a carry out of the largest finite value
    // makes the infinity's bits, as rounding should.
    let rounded = (b + vec2<u32>(0x7fffu) + ((b >> vec2<u32>(16u)) & vec2<u32>(1u))) >> vec2<u32>(16u);
    let h = select(rounded, (b >> vec2<u32>(16u)) | vec2<u32>(0x40u), nan);
#else
    // 65520 (0x477ff000) is the first f32 that rounds past f16's largest finite value, 65504.
    let overflow = magnitude >= vec2<u32>(0x477ff000u);
    let sign = (b >> vec2<u32>(16u)) & vec2<u32>(0x8000u);
    let finite = pack2x16float(clamp(v, vec2<f32>(-65504.0), vec2<f32>(65504.0)));
    let halves = vec2<u32>(finite & 0xffffu, finite >> 16u);
    let h = select(select(halves, sign | vec2<u32>(0x7c00u), overflow), sign | vec2<u32>(0x7e00u), nan);
#endif
    return h.x | (h.y << 16u);
}
