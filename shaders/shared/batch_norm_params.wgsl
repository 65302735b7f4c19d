// The parameters of every BatchNorm kernel (batch_norm.wgsl, batch_norm_apply4.wgsl).
#define_import_path gpunorm::batch_norm_params

// Keep in sync with `BatchNormParams` in src/gpu/batch_norm.rs (a test compares the two).
struct Params {
    positions: u32,
    channels: u32,
    spatial: u32,
    tile_cols: u32,
    tile_rows: u32,
    rows_per_tile: u32,
    // Row tiles of this chunk (stats_partial, stats_merge).
    row_tiles: u32,
    col_tiles: u32,
    eps: f32,
    // FLAG_GAMMA | FLAG_BETA | FLAG_MASK (gpunorm::common).
    flags: u32,
    // The first counted position, local to this chunk (stats_seed; only in the chunk holding it).
    first: u32,
    pad: u32,
}
