// Loads gpunorm's wasm module (built by scripts/build_web.sh into pkg/) and fills the page:
// the adapter, the worked example, then a large batch. `data-state` on <body> says when it is
// done ("done") or failed ("failed"), for scripts/page_test.py.
import init, { adapter, worked_example, large_batch } from "./pkg/gpunorm_web.js";

const status = document.getElementById("status");
const show = (id, html) => { document.getElementById(id).innerHTML = html; };

try {
  await init();
  show("adapter", await adapter());
  show("example", await worked_example());
  status.textContent = "Running a large batch on each backend…";
  show("batch", await large_batch(4096, 768));
  status.textContent = "Done.";
  document.body.dataset.state = "done";
} catch (e) {
  status.textContent = `Failed: ${e}`;
  status.className = "error";
  document.body.dataset.state = "failed";
}
