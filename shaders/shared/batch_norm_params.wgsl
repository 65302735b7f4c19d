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
    // The first counted position, local to this chunk (stats_seed; only in the chunk holding it);
    // seed_b and seed_c below are the next two (or `first` again where there are none in it).
    first: u32,
    // Columns of the whole tensor, and the first column of this call's block: a tensor too wide
    // for one binding of per-column statistics runs in blocks of columns, each with statistics
    // of its own, `channels` wide. Every index into x and y is a column of the whole tensor,
    // col_base + c; every index into columns and partials is one of the block, c.
    stride: u32,
    col_base: u32,
    // The weight of the batch in a running-statistics update (running_update).
    momentum: f32,
    seed_b: u32,
    seed_c: u32,
}
