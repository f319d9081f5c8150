"""Quick op timing probe (triton op, its passes, CLS-row composite eager and compiled), printed
per shape as it goes; used when a full bench_gpu run does not fit the lease.

Usage (device machine, repository root): ``python -m benchmarks.gpu_probe``."""
import time

import torch
import triton.testing as tt

import bsr_kernels
from bsr_kernels.baselines import eager_drop_composite
from bsr_kernels.ops import triton_backend as tb

from ._suite import make_inputs, min_bytes
from .bench_gpu import Rotating, cls_row_composite

g = torch.Generator(device="cuda").manual_seed(0)
t0 = time.time()


def P(*a):
    print(f"[{time.time() - t0:6.1f}]", *a, flush=True)


SHAPES = [("B128", 128, 12, 197, 64), ("B32N577", 32, 12, 577, 64), ("B8", 8, 12, 197, 64),
          ("S256", 256, 6, 197, 64)]
for lab, b, h, n, d in SHAPES:
    sets = [make_inputs(b, n, h, h * d, torch.bfloat16, "cuda", generator=g)[:3]
            for _ in range(4)]
    res = {}
    for name, fn in [("triton", lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5)),
                     ("clsrow", cls_row_composite),
                     ("eager", lambda x, q, k: eager_drop_composite(x, q, k, 0.5))]:
        res[name] = tt.do_bench(Rotating(fn, sets), warmup=10, rep=50, return_mode="median")
    x, q, k = sets[0]
    nk = (n - 1 + 1) // 2
    s, _, _, sl = tb._launch_scores(q, k, d ** -0.5, 1, torch.float32, nk)
    res["p12"] = tt.do_bench(lambda: tb._launch_scores(q, k, d ** -0.5, 1, torch.float32, nk),
                             warmup=5, rep=30, return_mode="median")
    res["p3"] = tt.do_bench(lambda: tb._launch_gather(x, sl, s, 1, nk, True), warmup=5, rep=30,
                            return_mode="median")
    mb = min_bytes(b, h, n, h * d, dtype=torch.bfloat16, fused=True)
    P(lab, {k: round(v * 1000, 1) for k, v in res.items()}, "us; GB/s",
      round(mb / res["triton"] / 1e6))
c = torch.compile(cls_row_composite, dynamic=False)
for lab, b, h, n, d in SHAPES[:3]:
    sets = [make_inputs(b, n, h, h * d, torch.bfloat16, "cuda", generator=g)[:3]
            for _ in range(4)]
    c(*sets[0])
    P("compiled", lab)
    t = tt.do_bench(Rotating(c, sets), warmup=10, rep=50, return_mode="median")
    t2 = tt.do_bench(Rotating(lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5), sets),
                     warmup=10, rep=50, return_mode="median")
    P(lab, "compiled composite us", round(t * 1000, 1), "triton us", round(t2 * 1000, 1))
