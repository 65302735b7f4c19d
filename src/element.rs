//! The element types of the host-slice ops: `f32`, and the half-precision `half::f16` and
//! `half::bf16`, stored in half and computed in f32.
//!
//! A half tensor is widened to f32 on the way in and each output rounded to its type once on
//! the way out: every statistic and every sum is accumulated in f32 (with the same shifted
//! two-pass as f32 tensors), so a row whose sum passes f16's largest value (65504) normalizes
//! as well as any other. Conversions run on every core, with `half`'s vectorised slice
//! conversions (F16C where the CPU has it). gamma, beta, masks, running statistics and the
//! parameter gradients stay f32, as in PyTorch's mixed-precision norms.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
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

/// `Element` for the two half types, through `half`'s slice conversions.
macro_rules! half_element {
    ($t:ty, $name:literal, $type:ident) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            const TYPE: ElementType = ElementType::$type;
        }

        impl Sealed for $t {
            const IS_F32: bool = false;

            fn widen_into(src: &[$t], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst);
            }

            fn narrow_into(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src);
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

/// The values as f32: borrowed where they are f32, else converted on every core.
pub(crate) fn widen<T: Element>(values: &[T]) -> Cow<'_, [f32]> {
    if let Some(values) = T::as_f32_ref(values) {
        return Cow::Borrowed(values);
    }
    let mut wide = crate::ops::new_output(values.len());
    wide.par_chunks_mut(CONVERT_CHUNK)
        .zip(values.par_chunks(CONVERT_CHUNK))
        .for_each(|(w, v)| T::widen_into(v, w));
    Cow::Owned(wide)
}

/// f32 values rounded to `T`, each once, on every core (the vector itself where `T` is f32).
pub(crate) fn narrow<T: Element>(values: Vec<f32>) -> Vec<T> {
    T::from_f32_vec(values).unwrap_or_else(|values| {
        let mut out = crate::ops::new_output(values.len());
        narrow_into(&values, &mut out);
        out
    })
}

/// `src` rounded into `dst`, on every core.
fn narrow_into<T: Element>(src: &[f32], dst: &mut [T]) {
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
            narrow_into(&wide, y);
        }
    }
}
