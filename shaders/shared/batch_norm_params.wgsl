// The parameters of every BatchNorm kernel (batch_norm.wgsl, batch_norm_apply4.wgsl).

// Keep in sync with `BatchNormParams` in src/batch_norm.rs.
struct Params {
    positions: u32,
    channels: u32,
    spatial: u32,
    // Index of this chunk's first row tile in `partials`.
    tile_offset: u32,
    tile_cols: u32,
    tile_rows: u32,
    rows_per_tile: u32,
    // Row tiles of this chunk (stats_partial) or of the whole tensor (stats_merge).
    row_tiles: u32,
    col_tiles: u32,
    eps: f32,
    // bit 0: multiply by gamma; bit 1: add beta; bit 2: read the mask.
    flags: u32,
    total_tiles: u32,
    // The first counted position, local to this chunk (stats_seed; only in the chunk holding it).
    first: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
