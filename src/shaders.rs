//! The WGSL sources, embedded at compile time, and how they are put together.
//!
//! An op's shader is written against constants (the workgroup size `WG`, threads per row `T`,
//! elements per thread `K`), an element type `V` (`f32` or `vec4<f32>`) and a workgroup sum that
//! it does not define: the host prepends the constants, `shared/scalar.wgsl` or
//! `shared/vec4.wgsl`, and `shared/reduce.wgsl` or `shared/reduce_subgroup.wgsl` (BatchNorm: its
//! `Params` from `shared/batch_norm_params.wgsl`). Each combination is its own pipeline, cached
//! under a key that names it. Every assembled module is parsed and validated by naga in this
//! module's tests.

const LAYER_NORM: &str = include_str!("../shaders/layer_norm.wgsl");
const BATCH_NORM: &str = include_str!("../shaders/batch_norm.wgsl");
const BATCH_NORM_APPLY4: &str = include_str!("../shaders/batch_norm_apply4.wgsl");
const BATCH_NORM_PARAMS: &str = include_str!("../shaders/shared/batch_norm_params.wgsl");
const SCALAR: &str = include_str!("../shaders/shared/scalar.wgsl");
const VEC4: &str = include_str!("../shaders/shared/vec4.wgsl");
const REDUCE: &str = include_str!("../shaders/shared/reduce.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../shaders/shared/reduce_subgroup.wgsl");

/// How many f32 each load and store of a kernel moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Width {
    Scalar,
    Vec4,
}

impl Width {
    /// Vec4 when every row (and every per-feature parameter) splits into whole vec4s.
    pub fn for_features(features: usize) -> Self {
        if features.is_multiple_of(4) {
            Width::Vec4
        } else {
            Width::Scalar
        }
    }

    /// f32 values per element.
    pub fn lanes(self) -> usize {
        match self {
            Width::Scalar => 1,
            Width::Vec4 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Width::Scalar => "f32",
            Width::Vec4 => "vec4",
        }
    }
}

/// How a workgroup adds up one value per thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Reduce {
    /// A shared-memory tree: works everywhere.
    Tree,
    /// Subgroup sums, then one shared-memory step: needs `Features::SUBGROUP`.
    Subgroup,
}

impl Reduce {
    pub fn name(self) -> &'static str {
        match self {
            Reduce::Tree => "tree",
            Reduce::Subgroup => "subgroup",
        }
    }
}

/// The LayerNorm module: `wg` threads per workgroup; in `layer_norm_held`, `per_row` threads per
/// row (a power of two, at most `wg`) holding `held` elements each (at least 1). The looped
/// `layer_norm` ignores both.
pub(crate) fn layer_norm(width: Width, reduce: Reduce, wg: u32, per_row: u32, held: u32) -> String {
    let element = match width {
        Width::Scalar => SCALAR,
        Width::Vec4 => VEC4,
    };
    let reduce = match reduce {
        Reduce::Tree => REDUCE,
        Reduce::Subgroup => REDUCE_SUBGROUP,
    };
    let consts =
        format!("const WG: u32 = {wg}u;\nconst T: u32 = {per_row}u;\nconst K: u32 = {held}u;\n");
    [&consts, element, reduce, LAYER_NORM].join("\n")
}

/// The BatchNorm module: 256-thread workgroups, shared-memory column sums.
pub(crate) fn batch_norm() -> String {
    [
        "const WG: u32 = 256u;\n",
        BATCH_NORM_PARAMS,
        REDUCE,
        BATCH_NORM,
    ]
    .join("\n")
}

/// BatchNorm's elementwise pass four values at a time (`apply4`).
pub(crate) fn batch_norm_apply4() -> String {
    [
        "const WG: u32 = 256u;\n",
        BATCH_NORM_PARAMS,
        BATCH_NORM_APPLY4,
    ]
    .join("\n")
}

/// Every module the host may build, by name; the naga test walks it.
#[cfg(test)]
fn all_modules() -> Vec<(String, String)> {
    let mut all = vec![
        ("batch_norm".to_owned(), batch_norm()),
        ("batch_norm apply4".to_owned(), batch_norm_apply4()),
        // Used by `gpunorm bench` for the copy ceiling; validated here with the rest.
        (
            "bench_copy".to_owned(),
            include_str!("../shaders/bench_copy.wgsl").to_owned(),
        ),
    ];
    for width in [Width::Scalar, Width::Vec4] {
        for reduce in [Reduce::Tree, Reduce::Subgroup] {
            for (per_row, held) in [(1, 1), (16, 1), (256, 1), (256, 8)] {
                all.push((
                    format!(
                        "layer_norm {} {} t{per_row} k{held}",
                        width.name(),
                        reduce.name()
                    ),
                    layer_norm(width, reduce, 256, per_row, held),
                ));
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates every shader at every width with naga, so a WGSL mistake fails
    /// `cargo test` on a machine without a GPU.
    #[test]
    fn every_shader_parses_and_validates() {
        for (name, wgsl) in all_modules() {
            let module = naga::front::wgsl::parse_str(&wgsl)
                .unwrap_or_else(|e| panic!("{name} does not parse:\n{}", e.emit_to_string(&wgsl)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name} does not validate:\n{}", e.emit_to_string(&wgsl)));
            assert!(!module.entry_points.is_empty(), "{name} has no entry point");
        }
    }
}
