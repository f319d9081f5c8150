"""Probe: lean and fast memory modes written as ``torch.utils.checkpoint`` with a
selective-checkpoint policy (SAC), the form the library runs under ``torch.compile``
(:func:`bsr_kernels.backward.checkpointed_block`), against the custom autograd Function it runs
eagerly, both eager and compiled.

Why: the custom Function's backward calls ``torch.autograd.grad``, so under ``torch.compile`` every
replayed block is a graph break and runs as in eager mode (issue 10 wants lean at >= 0.85x the
best mode on a GPU, where the best mode is compiled). Non-reentrant checkpointing is traced by
dynamo into the one graph. The policy saves what the mode saves (trained blocks: the qkv and
fc1 outputs in lean; every block: qkv, proj and fc1 in fast; projections are told apart by their
order in the block body) and the outputs of the drop op (so backward replays the forward's token
selection, never a recomputed one); everything else is recomputed. Here ``sac_lean`` and
``sac_fast`` take that form eagerly too, and compiled ``lean`` / ``fast`` are the library's own
(since 2026-11-27 the same form: the probe's compiled rows of the two should agree).

What it measures, against ``reprogram`` autograd / lean / fast:

* ``exact``: float64 gradients of a tiny 12-block ViT against autograd mode (max abs difference);
* ``memory``: bytes of the storages created during one forward that are still alive after it,
  parameters, input and output excluded, per image (ViT-B/16 at B=2, fp32, on CPU). For the
  library's modes this equals ``bsr_kernels.profile``'s saved-activation figure; SAC keeps its
  saved outputs outside ``saved_tensors_hooks``, where ``profile`` does not see them, so this
  probe counts live storages instead;
* ``compile``: graph breaks (``torch._dynamo.explain``) and compiled logits / gradients against
  eager (tiny ViT);
* ``time``: training steps side by side (the ``train_step`` section's timer and step), eager and
  compiled; on CUDA (ViT-B/16 B=128, bf16 autocast) also peak memory above the resident model.

Usage: ``python -m benchmarks.probe_sac [--device cuda] [--quick] [--json PATH]``
(``bench_gpu --parts sac`` runs it on a lent GPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bsr_kernels
from bsr_kernels.backward import checkpointed_block

from ._suite import COMPILE_MODES, SuiteConfig, create_vit, doc_summary

__all__ = ["sac_model", "live_bytes", "run", "MODES"]

#: Models compared: the library's modes and their SAC forms.
MODES = ("autograd", "lean", "sac_lean", "fast", "sac_fast")


def _sac_forward(self, x, attn_mask=None, is_causal=False):
    """A reprogrammed block's forward that takes the library's checkpointed form
    (:func:`bsr_kernels.backward.checkpointed_block`, what ``torch.compile`` runs) eagerly too."""
    if self.bsr_no_grad or not torch.is_grad_enabled():
        with torch.set_grad_enabled(not self.bsr_no_grad and torch.is_grad_enabled()):
            return self.body(x)
    return checkpointed_block(self, x)


def sac_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` (a timm ViT, changed in place) reprogrammed in ``mode`` (one of :data:`MODES`):
    ``sac_lean`` / ``sac_fast`` are lean / fast with each block's forward replaced (on the
    instance) by the library's selectively checkpointed form, eager or compiled."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sac = mode.startswith("sac_")
    bsr_kernels.reprogram(model, memory_mode=mode[4:] if sac else mode)
    if sac:
        for blk in model.blocks:
            blk.forward = types.MethodType(_sac_forward, blk)
    return model


class _Alive(TorchDispatchMode):
    """Records the storage of every op output (weakly)."""

    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.append((weakref.ref(s), s.nbytes(), s.data_ptr()))
        return out


def live_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages made during ``model(x)`` and alive after it (what backward
    keeps), parameters, buffers, the input and the output excluded."""
    rec = _Alive()
    with rec:
        out = model(x)
    seen = {t.untyped_storage().data_ptr()
            for t in [*model.parameters(), *model.buffers(), x, out]}
    total = 0
    for ref, nbytes, ptr in rec.storages:
        if ref() is not None and ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _tiny(dtype=torch.float32):
    return create_vit("tiny").to(dtype)


def check_exact() -> dict:
    torch.manual_seed(0)
    base = _tiny(torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = sac_model(copy.deepcopy(base), "autograd")
    ref(x).square().sum().backward()
    gr = _grads(ref)
    out = {}
    for mode in ("sac_lean", "sac_fast"):
        m = sac_model(copy.deepcopy(base), mode)
        m(x).square().sum().backward()
        g = _grads(m)
        out[mode] = dict(same_parameters=set(g) == set(gr),
                         max_abs_grad_diff=max(float((g[n] - gr[n]).abs().max()) for n in gr))
    return out


def check_memory(quick: bool) -> dict:
    base = create_vit("tiny" if quick else "vit_b16")
    size = base.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in MODES:
        m = sac_model(copy.deepcopy(base), mode)
        out[mode] = {"live_mib_per_image": live_bytes(m, x) / 2 / 2 ** 20}
        if not mode.startswith("sac_"):  # the library's own measure, for comparison
            labels = torch.zeros(2, dtype=torch.long)
            out[mode]["profile_mib_per_image"] = bsr_kernels.profile(
                m, x, labels)["saved_activation_mib_per_image"]
    return out


def check_compile() -> dict:
    base = _tiny()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("sac_lean", "sac_fast", "lean"):
        eager = sac_model(copy.deepcopy(base), mode)
        logits = eager(x)
        logits.square().sum().backward()
        torch._dynamo.reset()
        m = sac_model(copy.deepcopy(base), mode)
        breaks = torch._dynamo.explain(m)(x).graph_break_count
        torch._dynamo.reset()
        got = torch.compile(m)(x)
        got.square().sum().backward()
        ge, gc = _grads(eager), _grads(m)
        out[mode] = dict(graph_breaks=breaks,
                         logits_max_diff=float((got - logits).detach().abs().max()),
                         grad_max_diff=max(float((gc[n] - ge[n]).abs().max()) for n in ge))
        torch._dynamo.reset()
    return out


def time_modes(cfg: SuiteConfig, log=print, report=None, **timing) -> dict:
    """Step times (and CUDA peaks) of each mode, eager and compiled, side by side, with the
    ``train_step`` section's timer (:func:`bench_train_step.time_steps`; ``timing``: its
    ``guard``, ``deadline`` and ``build_s``). Every compiled variant compiles into one graph
    (compiled lean and fast are the checkpointed form too), so none slows the others down
    (:data:`bench_train_step.GRAPH_BREAKING`). Each timed variant's ``speed_vs_reference`` is
    its speed over ``reference``: compiled autograd mode, or eager autograd mode where that was
    not timed (left out for time, failed). ``report(partial)``, when given, gets this
    function's result so far each time the timer reports."""
    from .bench_train_step import time_steps
    order = ("autograd", "sac_lean", "sac_fast", "lean", "fast")
    variants = [*order, *(m + "+compile" for m in order)]

    def build(variant, batch):
        mode, _, how = variant.partition("+")
        model = sac_model(create_vit(cfg.time_model, device=cfg.device), mode)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=g).to(cfg.device)
        labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(cfg.device)
        module = torch.compile(model, dynamic=False, **COMPILE_MODES[how]) if how else model
        return model, module, [p for p in model.parameters() if p.requires_grad], images, labels

    def table(res):
        timings = res["timings"]
        reference = next((v for v in ("autograd+compile", "autograd") if v in timings), None)
        out = {}
        for name in variants:
            t = timings.get(name)
            out[name] = dict(res["peaks"].get(name, {}))
            if t is not None:
                out[name].update(step_ms=t.median * 1e3, reference=reference,
                                 speed_vs_reference=timings[reference].paired_ratio(t)
                                 if reference else None)
            if name in res["build_s"]:
                out[name]["build_s"] = res["build_s"][name]
            if name in res["errors"]:
                out[name]["error"] = res["errors"][name]
            if name in res["graph_breaks"]:
                out[name]["graph_breaks"] = res["graph_breaks"][name].get("count")
        return out

    return table(time_steps(cfg, variants, log, build=build,
                            report=report and (lambda partial: report(table(partial))),
                            **timing))


def run(cfg: SuiteConfig, parts=("exact", "memory", "compile", "time"), log=print,
        **timing) -> dict:
    """The probe's ``parts``; ``timing`` (``guard``, ``deadline``, ``build_s``, ``report``)
    goes to :func:`time_modes`."""
    res = {"device": cfg.device, "time_model": cfg.time_model, "time_batch": cfg.time_batch}
    fns = {"exact": check_exact, "memory": lambda: check_memory(cfg.tiny),
           "compile": check_compile, "time": lambda: time_modes(cfg, log, **timing)}
    for part in parts:
        t0 = time.perf_counter()
        res[part] = fns[part]()
        log(f"probe_sac {part} ({time.perf_counter() - t0:.0f} s): "
            + json.dumps(res[part], default=str)[:1500])
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=doc_summary(__doc__))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--tiny", action="store_true", help="tiny models (tests; figures meaningless)")
    ap.add_argument("--parts", default="exact,memory,compile,time",
                    help="comma-separated subset of exact, memory, compile, time")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in ("exact", "memory", "compile", "time")]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}")
    res = run(SuiteConfig(device=args.device, quick=args.quick, tiny=args.tiny), parts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
