#!/usr/bin/env bash
# Same-run f16/bf16 LayerNorm against PyTorch's CPU kernels, 2 threads: PyTorch's F.layer_norm
# set up as ../shared/anchors/torch_cpu_anchor.py sets it up (its f16 and bf16 lines alone),
# then gpunorm's allocating and into-a-buffer forms. PYTHON names a python with torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
date -u +"%Y-%m-%d %H:%M UTC"; nproc; grep -m1 "model name" /proc/cpuinfo || true
"${PYTHON:-python3}" - 65536x1024 16384x4096 <<'PY'
import sys, time, torch, torch.nn.functional as F
torch.set_num_threads(2)
print("torch", torch.__version__, "cpu threads", torch.get_num_threads())
def med(fn, n=7):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2]
for (n, d) in [tuple(map(int, s.split("x"))) for s in sys.argv[1:]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) + 3.0
    r = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g); b = torch.randn(d, generator=g)
    for name, dt in [("f16", torch.float16), ("bf16", torch.bfloat16)]:
        xh, wh, bh = x.to(dt), w.to(dt), b.to(dt)
        s = med(lambda: F.layer_norm(xh, (d,), wh, bh, 1e-5))
        print(f"torch-cpu layer_norm_{name:<5} {n}x{d}: {s*1e3:9.2f} ms  {4*n*d/s/1e9:7.2f} GB/s")
PY
for dtype in f16 bf16; do
    target/release/gpunorm bench --cpu --threads 2 --dtype "$dtype" --ops layer_norm_alloc,layer_norm \
        --shapes 65536x1024,16384x4096 --reps 7 | grep -E "^  (copy|layer_norm)"
done
