"""PyTorch (CUDA) in f16 on the same card as gpunorm's H100 sweep, for same-run ratios (issue
targets: f16 LayerNorm and RMSNorm >= 90% of an f16 copy and >= PyTorch's f16 kernels).
GB/s counts the fewest bytes, in f16: x read once and y written once (2 x 2 bytes a value); the
LayerNorm backward reads x and dy and writes dx (3 x); the unfused add + LayerNorm pair moves
what the fused op must (x and r in, sum and y out: 4 x).
Usage: python3 torch_half_anchor.py 4096x768 65536x1024 ..."""
import sys

import torch
import torch.nn.functional as F

dev = "cuda"
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1:]] or [(65536, 1024)]
print("torch", torch.__version__, torch.cuda.get_device_name(), "f16")


def bench(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


for n, d in shapes:
    h = torch.float16
    x = (torch.randn(n, d, device=dev) + 3.0).to(h)
    r = torch.randn(n, d, device=dev).to(h)
    y = torch.empty_like(x)
    w = torch.randn(d, device=dev)
    b = torch.randn(d, device=dev)
    tensor = 2 * n * d  # bytes of one f16 tensor
    res = {
        "copy": (bench(lambda: y.copy_(x)), 2),
        # gamma and beta in f16 as well: the usual f16 call (gpunorm keeps them in f32).
        "layer_norm": (bench(lambda: F.layer_norm(x, (d,), w.to(h), b.to(h), 1e-5)), 2),
        "rms_norm": (bench(lambda: F.rms_norm(x, (d,), w.to(h), 1e-6)), 2),
        "add_layer_norm": (bench(lambda: F.layer_norm(x + r, (d,), w.to(h), b.to(h), 1e-5)), 4),
    }
    xr = x.clone().requires_grad_(True)
    wr = w.to(h).requires_grad_(True)
    br = b.to(h).requires_grad_(True)
    out = F.layer_norm(xr, (d,), wr, br, 1e-5)
    g = torch.randn_like(out)
    res["layer_norm_bwd"] = (
        bench(lambda: torch.autograd.grad(out, (xr, wr, br), g, retain_graph=True)),
        3,
    )
    for k, (ms, passes) in res.items():
        print(f"torch f16 {k:<15} {n}x{d}: {ms*1e3:9.1f} us  {passes*tensor/ms/1e6:8.1f} GB/s")
