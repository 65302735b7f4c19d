//! The element types of the host-slice ops: `f32`, and the half-precision `half::f16` and
//! `half::bf16`, stored in half and computed in f32.
//!
//! A half tensor is widened to f32 on the way in and each output rounded to its type once on
//! the way out: every statistic and every sum is accumulated in f32 (with the same shifted
//! two-pass as f32 tensors), so a row whose sum passes f16's largest value (65504) normalizes
//! as well as any other. Conversions run on every core, in vector loops (F16C for f16 where the
//! CPU has it). gamma, beta, masks, running statistics and the parameter gradients stay f32, as
//! in PyTorch's mixed-precision norms.

use std::borrow::Cow;

use half::{bf16, f16};
use rayon::prelude::*;

/// Values per task of a parallel conversion.
const CONVERT_CHUNK: usize = 1 << 16;

mod sealed {
    /// The conversions the ops need; private, so only gpunorm's types are [`Element`]s.
    pub trait Sealed: Sized + Copy + Send + Sync + bytemuck::Pod {
        /// f32 itself, whose slices the ops use as they are.
        const IS_F32: bool;
        /// `src` as f32 into `dst` (of the same length), on this thread.
        fn widen_into(src: &[Self], dst: &mut [f32]);
        /// `src` rounded into `dst` (of the same length), each value once, on this thread.
        fn narrow_into(src: &[f32], dst: &mut [Self]);
        /// The slice itself where it is f32, or back unchanged.
        fn as_f32(values: &mut [Self]) -> Result<&mut [f32], &mut [Self]>;
        /// The slice itself where it is f32.
        fn as_f32_ref(values: &[Self]) -> Option<&[f32]>;
        /// The vector itself where it is f32, or back unchanged.
        fn from_f32_vec(values: Vec<f32>) -> Result<Vec<Self>, Vec<f32>>;
    }
}

pub(crate) use sealed::Sealed;

/// An element type of gpunorm's host-slice ops: `f32`, [`half::f16`] or [`half::bf16`] (as
/// `gpunorm::half::{f16, bf16}`). Sealed: gpunorm implements it for these three alone.
///
/// Every host-slice op (`layer_norm`, `rms_norm`, the BatchNorm forms, the backward passes and
/// the fused add) takes `&[T]` and returns tensors of `T`. The statistics inside are f32
/// whatever `T` is, and each output is rounded to `T` once; an output past `T`'s range becomes
/// ±infinity, never NaN.
///
/// ```
/// use gpunorm::half::f16;
/// use gpunorm::{LayerNorm, Normalizer};
/// let x: Vec<f16> = [1.0f32, 2.0, 3.0].iter().map(|&v| f16::from_f32(v)).collect();
/// let y: Vec<f16> = Normalizer::cpu().layer_norm(&x, 3, &LayerNorm::default())?;
/// assert!((y[2].to_f32() - 1.2247).abs() < 2e-3);
/// # Ok::<(), gpunorm::NormError>(())
/// ```
pub trait Element:
    Sealed + Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The type's name: "f32", "f16" or "bf16".
    const NAME: &'static str;
    /// The type as a value, as a [`GpuTensor`](crate::GpuTensor) records what it holds.
    const TYPE: ElementType;
}

/// Which [`Element`] a [`GpuTensor`](crate::GpuTensor) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// `f32`: 4 bytes a value.
    F32,
    /// `half::f16`: 2 bytes a value.
    F16,
    /// `half::bf16`: 2 bytes a value.
    BF16,
}

impl ElementType {
    /// Bytes of one value.
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::BF16 => 2,
        }
    }

    /// The type's name: "f32", "f16" or "bf16".
    pub fn name(self) -> &'static str {
        match self {
            ElementType::F32 => f32::NAME,
            ElementType::F16 => f16::NAME,
            ElementType::BF16 => bf16::NAME,
        }
    }

    /// Bytes of `len` values as a device buffer holds them: rounded up to whole 4-byte words
    /// (wgpu copies and binds words), or None where that overflows.
    pub(crate) fn buffer_bytes(self, len: usize) -> Option<u64> {
        let bytes = len.checked_mul(self.size())?.checked_next_multiple_of(4)?;
        u64::try_from(bytes).ok()
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    const TYPE: ElementType = ElementType::F32;
}

impl Sealed for f32 {
    const IS_F32: bool = true;

    fn widen_into(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn narrow_into(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn as_f32(values: &mut [f32]) -> Result<&mut [f32], &mut [f32]> {
        Ok(values)
    }

    fn as_f32_ref(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }

    fn from_f32_vec(values: Vec<f32>) -> Result<Vec<f32>, Vec<f32>> {
        Ok(values)
    }
}

/// `Element` for the two half types, through [`simd`]'s slice conversions.
macro_rules! half_element {
    ($t:ty, $name:literal, $type:ident) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            const TYPE: ElementType = ElementType::$type;
        }

        impl Sealed for $t {
            const IS_F32: bool = false;

            #[inline]
            fn widen_into(src: &[$t], dst: &mut [f32]) {
                simd::widen(src, dst);
            }

            #[inline]
            fn narrow_into(src: &[f32], dst: &mut [$t]) {
                simd::narrow(src, dst);
            }

            fn as_f32(values: &mut [$t]) -> Result<&mut [f32], &mut [$t]> {
                Err(values)
            }

            fn as_f32_ref(_: &[$t]) -> Option<&[f32]> {
                None
            }

            fn from_f32_vec(values: Vec<f32>) -> Result<Vec<$t>, Vec<f32>> {
                Err(values)
            }
        }
    };
}

half_element!(f16, "f16", F16);
half_element!(bf16, "bf16", BF16);

/// Slice conversions between the half types and f32, in loops the compiler keeps in vector
/// registers. `half`'s own slice conversions make a call per 8 values (through a function
/// pointer), which cost as much as the normalization they fed.
mod simd {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};

    /// A half type's conversions of whole slices (of one length).
    pub(super) trait Convert: Sized {
        fn widen(src: &[Self], dst: &mut [f32]);
        fn narrow(src: &[f32], dst: &mut [Self]);
    }

    #[inline]
    pub(super) fn widen<T: Convert>(src: &[T], dst: &mut [f32]) {
        T::widen(src, dst);
    }

    #[inline]
    pub(super) fn narrow<T: Convert>(src: &[f32], dst: &mut [T]) {
        T::narrow(src, dst);
    }

    /// f16 through F16C (`vcvtph2ps` / `vcvtps2ph`, 8 values an instruction, rounding to nearest
    /// even, overflow to ±infinity, NaN kept) where the CPU has it, else `half`'s conversions
    /// (which use the same instructions on other architectures).
    impl Convert for f16 {
        #[inline]
        fn widen(src: &[f16], dst: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("f16c") {
                // SAFETY: the CPU has F16C (and so AVX), checked just above.
                return unsafe { f16c::widen(src, dst) };
            }
            src.convert_to_f32_slice(dst);
        }

        #[inline]
        fn narrow(src: &[f32], dst: &mut [f16]) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("f16c") {
                // SAFETY: as in `widen`.
                return unsafe { f16c::narrow(src, dst) };
            }
            dst.convert_from_f32_slice(src);
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod f16c {
        use std::arch::x86_64::{
            __m128i, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
            _mm_loadu_si128, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
        };

        use half::f16;
        use half::slice::HalfFloatSliceExt;

        /// Values per instruction.
        const LANES: usize = 8;

        #[inline]
        #[target_feature(enable = "avx,f16c")]
        pub(super) unsafe fn widen(src: &[f16], dst: &mut [f32]) {
            assert_eq!(src.len(), dst.len());
            let whole = src.len() / LANES * LANES;
            for (s, d) in src[..whole]
                .chunks_exact(LANES)
                .zip(dst[..whole].chunks_exact_mut(LANES))
            {
                // SAFETY: `s` holds 8 f16 (16 bytes) and `d` 8 f32 (32 bytes); both intrinsics
                // take unaligned addresses.
                unsafe {
                    let v = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(v));
                }
            }
            if whole < src.len() {
                src[whole..].convert_to_f32_slice(&mut dst[whole..]);
            }
        }

        #[inline]
        #[target_feature(enable = "avx,f16c")]
        pub(super) unsafe fn narrow(src: &[f32], dst: &mut [f16]) {
            assert_eq!(src.len(), dst.len());
            let whole = src.len() / LANES * LANES;
            for (s, d) in src[..whole]
                .chunks_exact(LANES)
                .zip(dst[..whole].chunks_exact_mut(LANES))
            {
                // SAFETY: as in `widen`, the other way.
                unsafe {
                    let v =
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
                    _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), v);
                }
            }
            if whole < src.len() {
                dst[whole..].convert_from_f32_slice(&src[whole..]);
            }
        }
    }

    /// bf16 is the upper half of an f32: widening is a shift, and narrowing rounds the lower
    /// half away to nearest even; both quiet NaNs, as `half` does. The selects compile
    /// branch-free, so the loops vectorize.
    impl Convert for bf16 {
        #[inline]
        fn widen(src: &[bf16], dst: &mut [f32]) {
            assert_eq!(src.len(), dst.len());
            for (d, s) in dst.iter_mut().zip(src) {
                let b = u32::from(s.to_bits());
                // A NaN comes back quiet, as `half`'s scalar conversion gives it.
                let quiet = if b & 0x7fff > 0x7f80 { 0x40 } else { 0 };
                *d = f32::from_bits((b | quiet) << 16);
            }
        }

        #[inline]
        fn narrow(src: &[f32], dst: &mut [bf16]) {
            assert_eq!(src.len(), dst.len());
            for (d, s) in dst.iter_mut().zip(src) {
                let b = s.to_bits();
                let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
                let quiet = (b >> 16) | 0x40;
                let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
                *d = bf16::from_bits(if nan { quiet } else { rounded } as u16);
            }
        }
    }
}

/// The values as f32: borrowed where they are f32, else converted on every core.
pub(crate) fn widen<T: Element>(values: &[T]) -> Cow<'_, [f32]> {
    if let Some(values) = T::as_f32_ref(values) {
        return Cow::Borrowed(values);
    }
    let mut wide = crate::ops::new_output(values.len());
    widen_all(values, &mut wide);
    Cow::Owned(wide)
}

/// f32 values rounded to `T`, each once, on every core (the vector itself where `T` is f32).
pub(crate) fn narrow<T: Element>(values: Vec<f32>) -> Vec<T> {
    T::from_f32_vec(values).unwrap_or_else(|values| {
        let mut out = crate::ops::new_output(values.len());
        narrow_all(&values, &mut out);
        out
    })
}

/// `src` as f32 into `dst` (of the same length), on every core.
pub(crate) fn widen_all<T: Element>(src: &[T], dst: &mut [f32]) {
    dst.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| T::widen_into(s, d));
}

/// `src` rounded into `dst`, on every core.
pub(crate) fn narrow_all<T: Element>(src: &[f32], dst: &mut [T]) {
    dst.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| T::narrow_into(s, d));
}

/// An op's output of `T` as the f32 slice the backends write: the caller's own slice where `T`
/// is f32, else an f32 buffer rounded into it by [`OutputOf::finish`].
pub(crate) enum OutputOf<'a, T> {
    F32(&'a mut [f32]),
    Staged(Vec<f32>, &'a mut [T]),
}

impl<'a, T: Element> OutputOf<'a, T> {
    pub fn new(y: &'a mut [T]) -> OutputOf<'a, T> {
        match T::as_f32(y) {
            Ok(y) => OutputOf::F32(y),
            Err(y) => OutputOf::Staged(crate::ops::new_output(y.len()), y),
        }
    }

    pub fn values(&mut self) -> &mut [f32] {
        match self {
            OutputOf::F32(y) => y,
            OutputOf::Staged(wide, _) => wide,
        }
    }

    /// Rounds the f32 values into the caller's slice (nothing to do for f32).
    pub fn finish(self) {
        if let OutputOf::Staged(wide, y) = self {
            narrow_all(&wide, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose rounding to a half type is a hard case: ties, overflow, subnormals, signed
    /// zeros, infinities and NaNs, and a spread of ordinary values.
    fn hard_f32s() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.9,
            65520.0,
            -65520.0,
            1e10,
            -1e10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            6.0e-8,
            2.98e-8,
            3.0e-8,
            1e-40,
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            3.3895314e38,
            3.4e38,
        ];
        let mut state = 0x9E37_79B9u32;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            v.push(f32::from_bits(state));
        }
        v
    }

    /// The slice conversions give `half`'s scalar conversions' bits, for every f16 and bf16
    /// value (widening) and for the hard f32 cases (narrowing), at lengths with and without a
    /// tail past the vector width.
    #[test]
    fn slice_conversions_match_the_scalar_ones() {
        let every: Vec<u16> = (0..=u16::MAX).collect();
        let h: Vec<f16> = every.iter().map(|&b| f16::from_bits(b)).collect();
        let mut wide = vec![0f32; h.len()];
        f16::widen_into(&h, &mut wide);
        for (w, v) in wide.iter().zip(&h) {
            assert_eq!(
                w.to_bits(),
                v.to_f32().to_bits(),
                "f16 {:#06x}",
                v.to_bits()
            );
        }
        let b: Vec<bf16> = every.iter().map(|&b| bf16::from_bits(b)).collect();
        bf16::widen_into(&b, &mut wide);
        for (w, v) in wide.iter().zip(&b) {
            assert_eq!(
                w.to_bits(),
                v.to_f32().to_bits(),
                "bf16 {:#06x}",
                v.to_bits()
            );
        }
        let values = hard_f32s();
        for len in [values.len(), values.len() - 3, 7] {
            let src = &values[..len];
            let mut h = vec![f16::ZERO; len];
            f16::narrow_into(src, &mut h);
            for (n, &v) in h.iter().zip(src) {
                assert_eq!(n.to_bits(), f16::from_f32(v).to_bits(), "f16 of {v:e}");
            }
            let mut b = vec![bf16::ZERO; len];
            bf16::narrow_into(src, &mut b);
            for (n, &v) in b.iter().zip(src) {
                assert_eq!(n.to_bits(), bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
            }
        }
    }
}
