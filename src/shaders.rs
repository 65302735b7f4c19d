//! The WGSL sources, embedded at compile time, and how they are put together.
//!
//! An op's shader is written against an element type `V` (f32 or vec4<f32>) that it does not
//! define: the host prepends `shared/scalar.wgsl` or `shared/vec4.wgsl`, then the shared helpers
//! it needs. Every assembled module is parsed and validated by naga in this module's tests.

pub(crate) const LAYER_NORM: &str = include_str!("../shaders/layer_norm.wgsl");
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
        if features % 4 == 0 {
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

/// Every (name, op source) pair the host may assemble; the naga test walks it.
#[cfg(test)]
pub(crate) const ALL: &[(&str, &str)] = &[("layer_norm", LAYER_NORM)];

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates every shader at every width with naga, so a WGSL mistake fails
    /// `cargo test` on a machine without a GPU.
    #[test]
    fn every_shader_parses_and_validates() {
        for &(name, source) in ALL {
            for width in [Width::Scalar, Width::Vec4] {
                let wgsl = assemble(width, source);
                let module = naga::front::wgsl::parse_str(&wgsl).unwrap_or_else(|e| {
                    panic!(
                        "{name} ({width:?}) does not parse:\n{}",
                        e.emit_to_string(&wgsl)
                    )
                });
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module)
                .unwrap_or_else(|e| {
                    panic!(
                        "{name} ({width:?}) does not validate:\n{}",
                        e.emit_to_string(&wgsl)
                    )
                });
                assert!(
                    !module.entry_points.is_empty(),
                    "{name} ({width:?}) has no entry point"
                );
            }
        }
    }
}
