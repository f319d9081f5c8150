"""Quick op timing probe (triton op, its passes, CLS-row composite eager and compiled), printed
per shape as it goes; used when a full bench_gpu.py run does not fit the lease."""
import sys
import time

import torch
import triton.testing as tt

sys.path.insert(0, "benchmarks")
import bsr_kernels  # noqa: E402
from bench_gpu import cls_row_composite, min_bytes, qkv_inputs  # noqa: E402
from bsr_kernels.baselines import eager_drop_composite  # noqa: E402
from bsr_kernels.ops import triton_backend as tb  # noqa: E402

g = torch.Generator(device="cuda").manual_seed(0)
t0 = time.time()


def P(*a):
    print(f"[{time.time() - t0:6.1f}]", *a, flush=True)


def rot(fn, sets):
    i = [0]

    def f():
        i[0] = (i[0] + 1) % len(sets)
        return fn(*sets[i[0]])
    return f


SHAPES = [("B128", 128, 12, 197, 64), ("B32N577", 32, 12, 577, 64), ("B8", 8, 12, 197, 64),
          ("S256", 256, 6, 197, 64)]
for lab, b, h, n, d in SHAPES:
    sets = [qkv_inputs(b, h, n, d, torch.bfloat16, "cuda", g)[:3] for _ in range(4)]
    res = {}
    for name, fn in [("triton", lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5)),
                     ("clsrow", cls_row_composite),
                     ("eager", lambda x, q, k: eager_drop_composite(x, q, k, 0.5))]:
        res[name] = tt.do_bench(rot(fn, sets), warmup=10, rep=50, return_mode="median")
    x, q, k = sets[0]
    nk = (n - 1 + 1) // 2
    s, _, _, sl = tb._launch_scores(q, k, d ** -0.5, 1, torch.float32, nk)
    res["p12"] = tt.do_bench(lambda: tb._launch_scores(q, k, d ** -0.5, 1, torch.float32, nk),
                             warmup=5, rep=30, return_mode="median")
    res["p3"] = tt.do_bench(lambda: tb._launch_gather(x, sl, s, 1, nk, True), warmup=5, rep=30,
                            return_mode="median")
    mb = min_bytes(b, h, n, d, h * d, 2)
    P(lab, {k: round(v * 1000, 1) for k, v in res.items()}, "us; GB/s",
      round(mb / res["triton"] / 1e6))
c = torch.compile(cls_row_composite, dynamic=False)
for lab, b, h, n, d in SHAPES[:3]:
    sets = [qkv_inputs(b, h, n, d, torch.bfloat16, "cuda", g)[:3] for _ in range(4)]
    c(*sets[0])
    P("compiled", lab)
    t = tt.do_bench(rot(c, sets), warmup=10, rep=50, return_mode="median")
    t2 = tt.do_bench(rot(lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5), sets), warmup=10,
                     rep=50, return_mode="median")
    P(lab, "compiled composite us", round(t * 1000, 1), "triton us", round(t2 * 1000, 1))
