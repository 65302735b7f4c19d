//! The wasm module of gpunorm's browser page (`web/index.html`): the worked example of a padded
//! batch, a large random batch on WebGPU and on the CPU fallback with times and the error against
//! the f64 reference, and the adapter found. Each export returns HTML for the page to show.
#![cfg(target_arch = "wasm32")]

use std::sync::OnceLock;

use gpunorm::{mask_from_lengths, reference, BatchNorm, LayerNorm, NormError, Normalizer};
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    /// The page's clock, in milliseconds.
    #[wasm_bindgen(js_namespace = performance)]
    fn now() -> f64;
}

/// The browser's WebGPU adapter, opened once, or why there is none.
static GPU: OnceLock<Result<Normalizer, NormError>> = OnceLock::new();

async fn gpu() -> &'static Result<Normalizer, NormError> {
    if GPU.get().is_none() {
        let opened = Normalizer::gpu_async().await;
        // One thread: nobody else can have set it meanwhile, but `set` would only refuse.
        let _ = GPU.set(opened);
    }
    GPU.get().expect("set above")
}

fn js(e: NormError) -> JsError {
    JsError::new(&e.to_string())
}

/// A paragraph naming the adapter, or saying why the page runs on the CPU fallback alone.
#[wasm_bindgen]
pub async fn adapter() -> String {
    match gpu().await {
        Ok(norm) => format!("<p>WebGPU adapter: <b>{}</b></p>", escape(&norm.describe())),
        Err(e) => format!(
            "<p>No WebGPU adapter ({}); only the CPU fallback runs.</p>",
            escape(&e.to_string())
        ),
    }
}

/// The example batch: two sequences padded to four tokens, d_model 3; the second sequence has
/// three real tokens, so its last position is padding.
const TOKENS: [(&str, [f32; 3]); 8] = [
    ("I", [1., 2., 3.]),
    ("love", [2., 4., 6.]),
    ("deep", [3., 6., 9.]),
    ("learning", [4., 8., 12.]),
    ("Transformers", [5., 10., 15.]),
    ("are", [6., 12., 18.]),
    ("powerful", [7., 13., 19.]),
    ("&lt;pad&gt;", [0., 0., 0.]),
];

/// LayerNorm of every position, and BatchNorm of feature 1 with the padding counted and masked,
/// as tables, on WebGPU where there is an adapter.
#[wasm_bindgen]
pub async fn worked_example() -> Result<String, JsError> {
    let cpu = Normalizer::cpu();
    let norm = gpu().await.as_ref().unwrap_or(&cpu);
    let on = if norm.is_gpu() {
        "WebGPU"
    } else {
        "the CPU fallback"
    };
    let x: Vec<f32> = TOKENS.iter().flat_map(|(_, v)| *v).collect();
    let mut html = String::from(
        "<p>Two sequences of four tokens, d_model 3, flattened to 8 positions. \
         \"I love deep learning\" fills its four positions; \"Transformers are powerful\" has \
         three tokens, so its fourth position is padding (all zeros).</p>",
    );

    let y = norm
        .layer_norm_async(&x, 3, &LayerNorm::default())
        .await
        .map_err(js)?;
    html += &format!(
        "<h3>LayerNorm on {on}: each position over its own 3 features</h3>\
         <table id=\"layer-norm\"><tr><th>position</th><th>x</th><th>y</th></tr>"
    );
    for ((word, v), out) in TOKENS.iter().zip(y.chunks(3)) {
        html += &format!(
            "<tr><td>{word}</td><td>{}</td><td>{}</td></tr>",
            triple(v),
            triple(out)
        );
    }
    html += "</table><p>\"I\" = [1, 2, 3] has mean 2 and standard deviation 0.816, so it \
             becomes [-1.22, 0, 1.22]. Every position is normalized alone: the padding stays \
             [0, 0, 0] and moves no other position.</p>";

    let all = norm
        .batch_norm_train_async(&x, 3, &BatchNorm::default())
        .await
        .map_err(js)?;
    let mask = mask_from_lengths(&[4, 3], 4).map_err(js)?;
    let masked_opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let masked = norm
        .batch_norm_train_async(&x, 3, &masked_opts)
        .await
        .map_err(js)?;
    html += &format!(
        "<h3>BatchNorm on {on}: each feature over all positions (feature 1 shown)</h3>\
         <table id=\"batch-norm\"><tr><th>position</th><th>x[1]</th>\
         <th>padding counted</th><th>padding masked</th></tr>"
    );
    for (i, (word, v)) in TOKENS.iter().enumerate() {
        html += &format!(
            "<tr><td>{word}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            v[0],
            all.y[3 * i],
            masked.y[3 * i]
        );
    }
    let (mean, std) = (
        (all.mean[0], masked.mean[0]),
        (all.var[0].sqrt(), masked.var[0].sqrt()),
    );
    html += &format!(
        "<tr><th>mean</th><td></td><td>{:.2}</td><td>{:.2}</td></tr>\
         <tr><th>std</th><td></td><td>{:.2}</td><td>{:.2}</td></tr></table>",
        mean.0, mean.1, std.0, std.1
    );
    html += &format!(
        "<p>Counted, the padding drags feature 1's mean from {:.2} to {:.2} and widens its std \
         from {:.2} to {:.2}: every real token's output shifts because of a position that is not \
         there. With the mask the padding is left out of the statistics ({} positions counted \
         instead of {}) and its output is 0. LayerNorm needs no mask: it never mixes positions, \
         which is why transformers use it.</p>",
        mean.1, mean.0, std.1, std.0, masked.count, all.count
    );
    Ok(html)
}

/// LayerNorm of a random `rows` × `features` batch on WebGPU (if any) and on the CPU fallback:
/// the median time of 3 warm runs (and of its kernel, where the adapter has timestamp queries)
/// and the largest error against the f64 reference, as a table.
#[wasm_bindgen]
pub async fn large_batch(rows: usize, features: usize) -> Result<String, JsError> {
    let x = data(rows * features, 7);
    let opts = LayerNorm::default();
    let expected = reference::layer_norm(&x, features, &opts);
    let cpu = Normalizer::cpu();
    let mut backends: Vec<(&str, &Normalizer)> = Vec::new();
    if let Ok(gpu) = gpu().await {
        backends.push(("WebGPU", gpu));
    }
    backends.push(("CPU fallback (wasm, one thread)", &cpu));
    let mut html = format!(
        "<h3>LayerNorm of a random {rows} × {features} batch ({:.1} MB)</h3>\
         <table id=\"large-batch\"><tr><th>backend</th><th>time (median of 3, warm)</th>\
         <th>max error vs f64</th><th>of which kernel</th></tr>",
        (rows * features * 4) as f64 / 1e6
    );
    let mut y = vec![0f32; x.len()];
    for (name, norm) in backends {
        norm.layer_norm_into_async(&x, features, &opts, &mut y)
            .await
            .map_err(js)?;
        let (mut times, mut kernels) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let start = now();
            let timing = norm
                .layer_norm_into_async(&x, features, &opts, &mut y)
                .await
                .map_err(js)?;
            times.push(now() - start);
            kernels.extend(timing.kernel.map(|k| k.as_secs_f64() * 1e3));
        }
        times.sort_by(f64::total_cmp);
        kernels.sort_by(f64::total_cmp);
        let kernel = match kernels.get(kernels.len() / 2) {
            Some(ms) => format!("{ms:.1} ms"),
            None => "—".to_owned(),
        };
        let err = reference::max_error(&y, &expected);
        html += &format!(
            "<tr><td>{name}</td><td>{:.1} ms</td><td>max error {err:.1e}</td><td>{kernel}</td></tr>",
            times[1]
        );
    }
    Ok(html + "</table>")
}

/// Three values to two decimals.
fn triple(v: &[f32]) -> String {
    format!("[{:.2}, {:.2}, {:.2}]", v[0], v[1], v[2])
}

/// `n` values uniform in [-1, 1), the same for the same seed (xorshift).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
