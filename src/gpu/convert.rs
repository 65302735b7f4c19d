//! Half tensors widened to f32 and narrowed back on the device (`shaders/convert.wgsl`), for the
//! ops that compute on f32 tensors alone: BatchNorm, and LayerNorm and RMSNorm of odd row
//! lengths, whose half rows do not fill whole words. LayerNorm and RMSNorm of even row lengths
//! read and write half tensors directly.

use std::borrow::Cow;

use super::context::GpuContext;
use super::grid;
use super::shaders::{Def, KernelDef, Slot, Source, WG};
use super::tensor::GpuTensor;
use crate::{ElementType, NormError};

const WIDEN: KernelDef = KernelDef {
    source: Source::Convert,
    entry: "widen",
    slots: &[Slot::Uniform(0), Slot::Read(1), Slot::ReadWrite(2)],
};
const NARROW: KernelDef = KernelDef {
    source: Source::Convert,
    entry: "narrow",
    slots: &[Slot::Uniform(0), Slot::Read(3), Slot::ReadWrite(4)],
};
/// Both kernels, for the tests.
#[cfg(test)]
pub(crate) const KERNELS: [&KernelDef; 2] = [&WIDEN, &NARROW];

// Keep in sync with `Params` in shaders/convert.wgsl (a test compares the two).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvertParams {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// The tensor as f32: itself where it is, else widened into a new f32 tensor (recorded and
/// submitted, not waited for).
pub(crate) async fn widened<'a>(
    ctx: &GpuContext,
    tensor: &'a GpuTensor,
) -> Result<Cow<'a, GpuTensor>, NormError> {
    if tensor.element_type() == ElementType::F32 {
        return Ok(Cow::Borrowed(tensor));
    }
    let wide = GpuTensor::new(ctx, tensor.len(), tensor.features(), ElementType::F32);
    convert(ctx, &WIDEN, tensor, &wide).await?;
    Ok(Cow::Owned(wide))
}

/// A tensor as `element`: itself where it holds that type already, else (an f32 tensor)
/// rounded into a new tensor, each value once.
pub(crate) async fn narrowed(
    ctx: &GpuContext,
    tensor: GpuTensor,
    element: ElementType,
) -> Result<GpuTensor, NormError> {
    if tensor.element_type() == element {
        return Ok(tensor);
    }
    debug_assert_eq!(tensor.element_type(), ElementType::F32);
    let packed = GpuTensor::new(ctx, tensor.len(), tensor.features(), element);
    convert(ctx, &NARROW, &tensor, &packed).await?;
    Ok(packed)
}

/// Records and submits `kernel` from `src` into `dst`, with the half type of whichever is half.
async fn convert(
    ctx: &GpuContext,
    kernel: &'static KernelDef,
    src: &GpuTensor,
    dst: &GpuTensor,
) -> Result<(), NormError> {
    let len = src.len();
    if len == 0 {
        return Ok(());
    }
    let bf16 = [src, dst]
        .iter()
        .any(|t| t.element_type() == ElementType::BF16);
    let label = format!("{} {}", kernel.entry, if bf16 { "bf16" } else { "f16" });
    let pipeline = ctx
        .pipeline(&label, kernel, &[("BF16", Def::Flag(bf16))])
        .await?;
    ctx.scoped("converting a half tensor", || {
        let params = ConvertParams {
            len: len as u32,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        };
        let params = ctx.buffer_with(
            "convert params",
            bytemuck::bytes_of(&params),
            wgpu::BufferUsages::UNIFORM,
        );
        let slices = [params.slice(..), src.values(), dst.values()];
        let bind_group = pipeline.bind_slices(ctx.device(), &slices);
        let mut encoder = ctx.encoder(&label);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&label),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            let words = len.div_ceil(2);
            let (gx, gy) = grid(words.div_ceil(WG as usize), ctx.max_groups());
            pass.dispatch_workgroups(gx, gy, 1);
        }
        ctx.queue().submit([encoder.finish()]);
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::{fields, shader_params};

    #[test]
    fn params_match_the_shader() {
        let (members, size) = shader_params(Source::Convert, &[]);
        assert_eq!(
            members,
            fields!(ConvertParams {
                len,
                _pad0,
                _pad1,
                _pad2
            })
        );
        assert_eq!(size as usize, std::mem::size_of::<ConvertParams>());
    }
}
