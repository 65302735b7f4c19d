//! The WGSL sources, embedded at compile time, and how each becomes a pipeline.
//!
//! Every file in `shaders/` names what it takes from elsewhere at its top: `#import` lines for the
//! shared modules in `shaders/shared/` and `#{NAME}` shader defs for the numbers the host picks.
//! naga_oil composes them into one naga module per combination of defs. Each kernel declares the
//! bindings it uses ([`KernelDef::slots`]); pipelines are built with exactly that layout, and this
//! module's tests check every declaration (and every `Params` struct) against the shaders by naga
//! reflection, on any machine, without a GPU.

use std::borrow::Cow;

use naga_oil::compose::{
    ComposableModuleDescriptor, Composer, NagaModuleDescriptor, ShaderDefValue,
};

use super::context::Checks;

/// Threads per workgroup of every gpunorm kernel (the shaders' `WG`).
pub(crate) const WG: u32 = 256;

/// Bits of a kernel's `Params.flags` (the shaders' `FLAG_*`).
pub(crate) mod flags {
    /// Multiply by gamma.
    pub const GAMMA: u32 = 1;
    /// Add beta.
    pub const BETA: u32 = 2;
    /// Read the mask (BatchNorm).
    pub const MASK: u32 = 4;
    /// Add onto the gradients of earlier chunks (LayerNorm backward).
    pub const ACCUMULATE: u32 = 8;

    /// The flags of an op's optional inputs.
    pub fn of(gamma: bool, beta: bool, mask: bool) -> u32 {
        (if gamma { GAMMA } else { 0 })
            | (if beta { BETA } else { 0 })
            | (if mask { MASK } else { 0 })
    }
}

/// The shared modules, in an order where each imports only those before it.
const SHARED: [(&str, &str); 4] = [
    (
        "shaders/shared/common.wgsl",
        include_str!("../../shaders/shared/common.wgsl"),
    ),
    (
        "shaders/shared/reduce.wgsl",
        include_str!("../../shaders/shared/reduce.wgsl"),
    ),
    (
        "shaders/shared/half.wgsl",
        include_str!("../../shaders/shared/half.wgsl"),
    ),
    (
        "shaders/shared/batch_norm_params.wgsl",
        include_str!("../../shaders/shared/batch_norm_params.wgsl"),
    ),
];

/// A shader file with entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    LayerNorm,
    BatchNorm,
    BatchNormApply4,
    BatchNormRows,
    Convert,
}

impl Source {
    fn file(self) -> (&'static str, &'static str) {
        match self {
            Source::LayerNorm => (
                "shaders/layer_norm.wgsl",
                include_str!("../../shaders/layer_norm.wgsl"),
            ),
            Source::BatchNorm => (
                "shaders/batch_norm.wgsl",
                include_str!("../../shaders/batch_norm.wgsl"),
            ),
            Source::BatchNormApply4 => (
                "shaders/batch_norm_apply4.wgsl",
                include_str!("../../shaders/batch_norm_apply4.wgsl"),
            ),
            Source::BatchNormRows => (
                "shaders/batch_norm_rows.wgsl",
                include_str!("../../shaders/batch_norm_rows.wgsl"),
            ),
            Source::Convert => (
                "shaders/convert.wgsl",
                include_str!("../../shaders/convert.wgsl"),
            ),
        }
    }
}

/// How an entry point uses one binding of group 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Uniform(u32),
    Read(u32),
    ReadWrite(u32),
}

impl Slot {
    fn layout_entry(self) -> wgpu::BindGroupLayoutEntry {
        let (binding, ty) = match self {
            Slot::Uniform(b) => (b, wgpu::BufferBindingType::Uniform),
            Slot::Read(b) => (b, wgpu::BufferBindingType::Storage { read_only: true }),
            Slot::ReadWrite(b) => (b, wgpu::BufferBindingType::Storage { read_only: false }),
        };
        wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }
    }

    fn binding(self) -> u32 {
        match self {
            Slot::Uniform(b) | Slot::Read(b) | Slot::ReadWrite(b) => b,
        }
    }

    /// Storage buffers among `slots`, for the per-stage limit.
    pub fn storage_count(slots: &[Slot]) -> u32 {
        slots
            .iter()
            .filter(|s| !matches!(s, Slot::Uniform(_)))
            .count() as u32
    }
}

/// One kernel: an entry point of a shader file and the bindings it uses, in binding order.
#[derive(Debug)]
pub(crate) struct KernelDef {
    pub source: Source,
    pub entry: &'static str,
    pub slots: &'static [Slot],
}

/// A shader def's value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Def {
    Flag(bool),
    U32(u32),
}

/// The shader defs every module gets: the numbers `gpunorm::common` names.
fn common_defs() -> [(&'static str, Def); 5] {
    [
        ("WG", Def::U32(WG)),
        ("FLAG_GAMMA", Def::U32(flags::GAMMA)),
        ("FLAG_BETA", Def::U32(flags::BETA)),
        ("FLAG_MASK", Def::U32(flags::MASK)),
        ("FLAG_ACCUMULATE", Def::U32(flags::ACCUMULATE)),
    ]
}

/// The naga module of `source` with `defs` (on top of the common ones). Subgroup operations
/// validate here whatever the device; the device checks them again when it builds the pipeline.
pub(crate) fn compose(
    source: Source,
    defs: &[(&'static str, Def)],
) -> Result<naga::Module, String> {
    let mut composer = Composer::default().with_capabilities(naga::valid::Capabilities::all());
    for (path, text) in SHARED {
        let added = composer.add_composable_module(ComposableModuleDescriptor {
            source: text,
            file_path: path,
            ..Default::default()
        });
        if let Err(e) = added {
            return Err(e.emit_to_string(&composer));
        }
    }
    // `#ifdef` asks whether a def exists, whatever its value: a flag that is off is left out.
    let shader_defs = common_defs()
        .iter()
        .chain(defs)
        .filter_map(|&(name, def)| {
            let value = match def {
                Def::Flag(false) => return None,
                Def::Flag(true) => ShaderDefValue::Bool(true),
                Def::U32(v) => ShaderDefValue::UInt(v),
            };
            Some((name.to_owned(), value))
        })
        .collect();
    let (path, text) = source.file();
    composer
        .make_naga_module(NagaModuleDescriptor {
            source: text,
            file_path: path,
            shader_defs,
            ..Default::default()
        })
        .map_err(|e| e.emit_to_string(&composer))
}

/// A compute pipeline with the bind-group layout its kernel declares.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: &'static [Slot],
    label: String,
}

impl Pipeline {
    /// Builds `kernel` from `module` on `device`, labelled `label`, with the runtime checks
    /// `checks` keeps.
    pub fn new(
        device: &wgpu::Device,
        kernel: &KernelDef,
        module: naga::Module,
        label: &str,
        checks: Checks,
    ) -> Pipeline {
        let entries: Vec<_> = kernel.slots.iter().map(|s| s.layout_entry()).collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Naga(Cow::Owned(module)),
        };
        let module = match checks {
            Checks::All => device.create_shader_module(desc),
            // SAFETY: what each dropped check guards against cannot happen in gpunorm's kernels:
            // - Loop bounding (infinite loops): every loop runs an index up to a bound by a
            //   positive step (WG, T, tile_rows, RUN, 1) or halves a stride down to 0.
            // - Division guards (division by zero): every divisor is a count the host validated
            //   to be at least 1 (features, channels, spatial, tile sizes) or a constant.
            // - Bounds checks (`Checks::None` only): every index into a binding is compared with
            //   the length the host validated and bound (rows * features, positions * channels,
            //   tile counts) before use, and every private array is indexed by a loop counter
            //   below its constant length. Vulkan's robustBufferAccess, which wgpu enables where
            //   the device has it, backs the first up.
            Checks::Bounds => unsafe {
                device.create_shader_module_trusted(
                    desc,
                    wgpu::ShaderRuntimeChecks {
                        force_loop_bounding: false,
                        int_div_checks: false,
                        ..wgpu::ShaderRuntimeChecks::checked()
                    },
                )
            },
            Checks::None => unsafe {
                device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            },
        };
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        Pipeline {
            pipeline,
            layout,
            slots: kernel.slots,
            label: label.to_owned(),
        }
    }

    /// A bind group of `buffers`, one per declared slot, in the same order.
    pub fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let whole: Vec<_> = buffers
            .iter()
            .map(|b| b.as_entire_buffer_binding())
            .collect();
        self.bind_spans(device, whole)
    }

    /// A bind group of spans of buffers (offset and size), one per declared slot, in order.
    pub fn bind_slices(
        &self,
        device: &wgpu::Device,
        slices: &[wgpu::BufferSlice<'_>],
    ) -> wgpu::BindGroup {
        let spans = slices.iter().map(|s| wgpu::BufferBinding {
            buffer: s.buffer(),
            offset: s.offset(),
            size: std::num::NonZeroU64::new(s.size()),
        });
        self.bind_spans(device, spans.collect())
    }

    fn bind_spans(
        &self,
        device: &wgpu::Device,
        spans: Vec<wgpu::BufferBinding<'_>>,
    ) -> wgpu::BindGroup {
        assert_eq!(
            spans.len(),
            self.slots.len(),
            "{}: one buffer per declared binding",
            self.label
        );
        let entries: Vec<_> = self
            .slots
            .iter()
            .zip(spans)
            .map(|(slot, span)| wgpu::BindGroupEntry {
                binding: slot.binding(),
                resource: wgpu::BindingResource::Buffer(span),
            })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.label),
            layout: &self.layout,
            entries: &entries,
        })
    }
}

/// Every (kernel, defs) the host may build, for the tests: each size class and width of
/// LayerNorm and RMSNorm (with and without the fused add, saving or not, and backward, with
/// saved statistics or not) with both reductions,
/// on f32 and half rows, every BatchNorm kernel, and the half conversions.
#[cfg(test)]
pub(crate) fn every_variant() -> Vec<(&'static KernelDef, Vec<(&'static str, Def)>)> {
    use crate::gpu::{batch_norm, layer_norm};
    let mut all = Vec::new();
    for kernel in batch_norm::KERNELS {
        for k in [1, 32] {
            all.push((kernel, vec![("K", Def::U32(k))]));
        }
    }
    for kernel in crate::gpu::convert::KERNELS {
        for bf16 in [false, true] {
            all.push((kernel, vec![("BF16", Def::Flag(bf16))]));
        }
    }
    // f32 rows of f32 and vec4 elements in every size class; vec2 rows and half rows (vec2 or
    // vec4 of packed words) in two.
    let every_class = [(1, 1), (16, 1), (256, 1), (256, 8), (256, 32)];
    let two_classes = [(16, 1), (256, 8)];
    // (size classes, [VEC4, VEC2, PACKED, BF16])
    let layouts = [
        (&every_class[..], [false, false, false, false]),
        (&every_class, [true, false, false, false]),
        (&two_classes, [false, true, false, false]),
        (&two_classes, [false, true, true, false]),
        (&two_classes, [true, false, true, false]),
        (&two_classes, [false, true, true, true]),
        (&two_classes, [true, false, true, true]),
    ];
    for rms in [false, true] {
        for (classes, [vec4, vec2, packed, bf16]) in layouts {
            for subgroup in [false, true] {
                for &(t, k) in classes {
                    for (kernel, def) in layer_norm::KERNELS {
                        let defs = vec![
                            ("RMS", Def::Flag(rms)),
                            ("ADD", Def::Flag(def == Some("ADD"))),
                            ("SAVE", Def::Flag(def == Some("SAVE"))),
                            ("SAVED", Def::Flag(def == Some("SAVED"))),
                            ("VEC4", Def::Flag(vec4)),
                            ("VEC2", Def::Flag(vec2)),
                            ("PACKED", Def::Flag(packed)),
                            ("BF16", Def::Flag(bf16)),
                            ("SUBGROUP", Def::Flag(subgroup)),
                            ("T", Def::U32(t)),
                            ("K", Def::U32(k)),
                        ];
                        all.push((kernel, defs));
                    }
                }
            }
        }
    }
    all
}

/// `(field name, byte offset)` of each field of a `#[repr(C)]` struct, for comparing it with its
/// WGSL twin: `fields!(Params { rows, features })`.
#[cfg(test)]
macro_rules! fields {
    ($t:ident { $($f:ident),* $(,)? }) => {
        vec![$((stringify!($f).to_string(), std::mem::offset_of!($t, $f) as u32)),*]
    };
}
#[cfg(test)]
pub(crate) use fields;
#[cfg(test)]
pub(crate) use tests::shader_params;

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_with(
        module: &naga::Module,
        name: &str,
        capabilities: naga::valid::Capabilities,
    ) -> naga::valid::ModuleInfo {
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
            .validate(module)
            .unwrap_or_else(|e| panic!("{name} does not validate: {e:?}"))
    }

    fn validate(module: &naga::Module, name: &str) -> naga::valid::ModuleInfo {
        validate_with(module, name, naga::valid::Capabilities::all())
    }

    /// Every composed shader parses and validates, so a WGSL mistake fails `cargo test` on a
    /// machine without a GPU; variants without SUBGROUP validate without subgroup operations, as
    /// a device without `Features::SUBGROUP` requires.
    #[test]
    fn every_shader_composes_and_validates() {
        use naga::valid::Capabilities;
        for (kernel, defs) in every_variant() {
            let module = compose(kernel.source, &defs)
                .unwrap_or_else(|e| panic!("{kernel:?} {defs:?} does not compose:\n{e}"));
            let subgroup = defs
                .iter()
                .any(|&(name, def)| name == "SUBGROUP" && matches!(def, Def::Flag(true)));
            let capabilities = if subgroup {
                Capabilities::all()
            } else {
                Capabilities::all() - Capabilities::SUBGROUP - Capabilities::SUBGROUP_BARRIER
            };
            validate_with(&module, kernel.entry, capabilities);
            assert!(
                module.entry_points.iter().any(|e| e.name == kernel.entry),
                "{kernel:?} has no entry point {}",
                kernel.entry
            );
        }
        // The copy kernel of `gpunorm bench` stands alone.
        let copy = include_str!("../../shaders/bench_copy.wgsl");
        let module = naga::front::wgsl::parse_str(copy).expect("bench_copy.wgsl parses");
        validate(&module, "bench_copy");
    }

    /// Every kernel variant translates to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and, without
    /// subgroups, GLSL (GL, which wgpu offers no subgroups on): a construct one of those backends
    /// rejects fails here, on a machine that has none of them.
    #[test]
    fn every_kernel_translates_to_every_native_language() {
        use naga::back::{glsl, hlsl, msl, spv};
        for (kernel, defs) in every_variant() {
            let module = compose(kernel.source, &defs).expect("composes");
            let info = validate(&module, kernel.entry);
            let what = format!("{} {defs:?}", kernel.entry);
            spv::write_vec(&module, &info, &spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("SPIR-V, {what}: {e}"));
            let metal = msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            msl::write_string(&module, &info, &metal, &msl::PipelineOptions::default())
                .unwrap_or_else(|e| panic!("MSL, {what}: {e}"));
            let dx12 = hlsl::Options {
                shader_model: hlsl::ShaderModel::V6_0,
                ..Default::default()
            };
            let mut out = String::new();
            hlsl::Writer::new(&mut out, &dx12, &hlsl::PipelineOptions::default())
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("HLSL, {what}: {e}"));
            let subgroup = defs
                .iter()
                .any(|&(name, def)| name == "SUBGROUP" && matches!(def, Def::Flag(true)));
            if subgroup {
                continue;
            }
            let gl = glsl::Options {
                version: glsl::Version::new_gles(310),
                ..Default::default()
            };
            let pipeline = glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: kernel.entry.to_owned(),
                multiview: None,
            };
            let mut out = String::new();
            glsl::Writer::new(&mut out, &module, &info, &gl, &pipeline, Default::default())
                .and_then(|mut w| w.write())
                .unwrap_or_else(|e| panic!("GLSL, {what}: {e}"));
        }
    }

    /// The bindings an entry point uses, with the access its shader declares, by reflection.
    fn reflected_slots(module: &naga::Module, entry: &str) -> Vec<Slot> {
        let info = validate(module, entry);
        let index = module
            .entry_points
            .iter()
            .position(|e| e.name == entry)
            .expect("entry point exists");
        let uses = info.get_entry_point(index);
        let mut slots: Vec<Slot> = module
            .global_variables
            .iter()
            .filter(|&(handle, _)| !uses[handle].is_empty())
            .filter_map(|(_, var)| {
                let binding = var.binding.as_ref()?;
                assert_eq!(binding.group, 0, "{entry}: every binding is in group 0");
                Some(match var.space {
                    naga::AddressSpace::Uniform => Slot::Uniform(binding.binding),
                    naga::AddressSpace::Storage { access }
                        if access.contains(naga::StorageAccess::STORE) =>
                    {
                        Slot::ReadWrite(binding.binding)
                    }
                    naga::AddressSpace::Storage { .. } => Slot::Read(binding.binding),
                    other => panic!("{entry}: binding in address space {other:?}"),
                })
            })
            .collect();
        slots.sort_by_key(|s| s.binding());
        slots
    }

    /// Each kernel's declared bind-group layout is exactly what its entry point uses, with the
    /// access the shader declares: a shader edit that adds, drops or changes a binding fails here.
    #[test]
    fn declared_layouts_match_the_shaders() {
        for (kernel, defs) in every_variant() {
            let module = compose(kernel.source, &defs).expect("composes");
            let mut declared = kernel.slots.to_vec();
            declared.sort_by_key(|s| s.binding());
            assert_eq!(
                declared, kernel.slots,
                "{}: slots are declared in binding order",
                kernel.entry
            );
            assert_eq!(
                reflected_slots(&module, kernel.entry),
                declared,
                "{} ({defs:?}): declared layout differs from the shader's",
                kernel.entry
            );
        }
    }

    /// The members (name and byte offset) and size of the uniform `Params` struct of `source`.
    pub(crate) fn shader_params(
        source: Source,
        defs: &[(&'static str, Def)],
    ) -> (Vec<(String, u32)>, u32) {
        let module = compose(source, defs).expect("composes");
        let (_, params) = module
            .global_variables
            .iter()
            .find(|(_, v)| v.space == naga::AddressSpace::Uniform)
            .expect("a uniform Params");
        match &module.types[params.ty].inner {
            naga::TypeInner::Struct { members, span } => (
                members
                    .iter()
                    .map(|m| (m.name.clone().unwrap_or_default(), m.offset))
                    .collect(),
                *span,
            ),
            other => panic!("Params is not a struct: {other:?}"),
        }
    }
}
