//! The WGSL sources, embedded at compile time, and how they are put together.
//!
//! An op's shader is written against an element type `V` (`f32` or `vec4<f32>`) that it does not
//! define: the host prepends `shared/scalar.wgsl` or `shared/vec4.wgsl`, then the shared helpers
//! it needs. Every assembled module is parsed and validated by naga in this module's tests.

pub(crate) const LAYER_NORM: &str = include_str!("../shaders/layer_norm.wgsl");
pub(crate) const BATCH_NORM: &str = include_str!("../shaders/batch_norm.wgsl");
const SCALAR: &str = include_str!("../shaders/shared/scalar.wgsl");
const VEC4: &str = include_str!("../shaders/shared/vec4.wgsl");
const REDUCE: &str = include_str!("../shaders/shared/reduce.wgsl");

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

    pub fn name(self) -> &'static str {
        match self {
            Width::Scalar => "f32",
            Width::Vec4 => "vec4",
        }
    }
}

/// The full WGSL module for an op's `source` at the given width.
pub(crate) fn assemble(width: Width, source: &str) -> String {
    let element = match width {
        Width::Scalar => SCALAR,
        Width::Vec4 => VEC4,
    };
    [element, REDUCE, source].join("\n")
}

/// The full WGSL module for an op that works element by element (no `V`): the shared
/// reduction helpers, then `source`.
pub(crate) fn assemble_plain(source: &str) -> String {
    [REDUCE, source].join("\n")
}

/// Every module the host may build, by name; the naga test walks it.
#[cfg(test)]
fn all_modules() -> Vec<(String, String)> {
    let mut all = vec![
        ("batch_norm".to_owned(), assemble_plain(BATCH_NORM)),
        // Used by `gpunorm bench` for the copy ceiling; validated here with the rest.
        (
            "bench_copy".to_owned(),
            include_str!("../shaders/bench_copy.wgsl").to_owned(),
        ),
    ];
    for width in [Width::Scalar, Width::Vec4] {
        all.push((
            format!("layer_norm {}", width.name()),
            assemble(width, LAYER_NORM),
        ));
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
