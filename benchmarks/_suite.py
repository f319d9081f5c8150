"""Shared pieces of the benchmark suite (``python -m benchmarks.run``): configuration, models,
variants, inputs.

* :class:`SuiteConfig`: device, dtype, sizes and repetitions of one run (``--quick``,
  ``--tiny``, ``--device``).
* :func:`create_vit`: random-init timm ViTs by suite name (``vit_b16``, ``deit_s``, ``tiny``).
* :func:`build_variant`: one training variant of a model (timm full fine-tuning, linear probe,
  the authors' eager BSR formulation, the plain-PyTorch BSR peer, ``bsr_kernels.reprogram``
  autograd / lean / fast / compressed), eager or under ``torch.compile`` (``+compile``,
  ``+cudagraphs``).
* :func:`make_step`: one optimizer step (forward, cross-entropy, backward, AdamW), with bf16
  autocast on CUDA; :func:`step_digest` / :func:`digest_diff` compare two runs of a step.
* :func:`cuda_peak_step`: peak ``torch.cuda.max_memory_allocated`` of a training step.
* :class:`Target`: a target value with its PASS/FAIL verdict.

* :func:`make_inputs`: the one input builder (x, q, k, v of one qkv tensor) of the drop and
  attention benchmarks, ``bench_gpu.py`` included; :func:`min_bytes`: the
  bytes a drop must move.

Timing itself is :mod:`benchmarks._timing` (A B A B, medians).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import subprocess
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

import bsr_kernels
from bsr_kernels import methods
from bsr_kernels.ops.common import num_kept

__all__ = ["SuiteConfig", "doc_summary", "make_inputs", "qkv_views", "min_bytes", "VARIANTS",
           "VARIANT_LABELS",
           "COMPILE_MODES", "COMPILED_VARIANTS", "GRAPH", "GRAPHED_VARIANTS", "is_graphed",
           "is_compiled", "split_variant",
           "variant_label", "create_vit", "model_label", "build_variant", "make_step",
           "step_digest", "digest_diff", "cuda_peak_step", "Target", "shown_percent",
           "machine_info", "free_memory", "MIB", "GIB"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = float(1 << 20)
GIB = float(1 << 30)

#: Eager training variants, in table order.
VARIANTS = ("full", "linear_probe", "eager_bsr", "peer_bsr", "bsr_autograd", "bsr_lean", "bsr_fast",
            "bsr_lean_bf16")
VARIANT_LABELS = {
    "full": "timm full fine-tuning",
    "linear_probe": "timm linear probe",
    "eager_bsr": "BSR, authors' eager formulation",
    "peer_bsr": "BSR in plain PyTorch (peer_bsr)",
    "bsr_autograd": "bsr_kernels reprogram, autograd",
    "bsr_lean": "bsr_kernels reprogram, lean",
    "bsr_fast": "bsr_kernels reprogram, fast",
    "bsr_lean_bf16": "bsr_kernels reprogram, lean, bf16 saved activations",
}
#: How a variant may run besides eagerly: ``<variant>+<how>`` -> ``torch.compile`` keywords.
COMPILE_MODES = {"compile": {}, "cudagraphs": dict(mode="reduce-overhead")}
#: The compiled variants of the ``train_step`` section (``+cudagraphs``: CUDA only). All compile
#: into one graph (lean and fast as selective checkpointing). A variant that breaks its graph
#: (``bench_train_step.GRAPH_BREAKING``) would leave cache entries that match other ViTs, so a
#: one-graph model compiled before or after it would run frame by frame: the section times such
#: variants in a later phase (``bench_train_step.timing_phases``).
COMPILED_VARIANTS = ("full+compile", "peer_bsr+compile", "bsr_autograd+compile",
                     "bsr_autograd+cudagraphs", "peer_bsr+cudagraphs", "bsr_lean+cudagraphs",
                     "bsr_fast+compile", "bsr_lean+compile")
#: ``<base>+graph``: the eager step (forward, backward, fused AdamW) captured whole in one CUDA
#: graph by hand (``torch.cuda.graph``, see :func:`make_step`) and replayed: no Python and no
#: launches per step, and nothing compiled, so the memory modes' custom backward is captured as
#: it is. CUDA only.
GRAPH = "graph"
GRAPHED_VARIANTS = ("peer_bsr+graph", "bsr_autograd+graph", "bsr_fast+graph", "bsr_lean+graph")


def is_graphed(variant: str) -> bool:
    """Whether ``variant`` is a ``<base>+graph`` one (any base: probe_sac names its own)."""
    return variant.partition("+")[2] == GRAPH


def is_compiled(variant) -> bool:
    """Whether a step variant (or a SAC entry) is compiled: ``+compile`` or ``+cudagraphs``, not
    eager or captured by hand (``+graph``)."""
    return str(variant).partition("+")[2] in COMPILE_MODES


def split_variant(variant: str) -> tuple[str, Optional[str]]:
    """``"bsr_lean+compile"`` -> ``("bsr_lean", "compile")``; an eager variant -> ``(v, None)``.

    Raises:
        ValueError: naming the variant, when its base or its compile mode is unknown.
    """
    base, _, how = variant.partition("+")
    if base not in VARIANTS or (how and how not in (*COMPILE_MODES, GRAPH)):
        raise ValueError(f"variant must be one of {VARIANTS}, optionally with "
                         f"+{'|+'.join((*COMPILE_MODES, GRAPH))}, got {variant!r}")
    return base, how or None


def variant_label(variant: str) -> str:
    """Human name of a variant, compiled ones included."""
    base, how = split_variant(variant)
    return VARIANT_LABELS[base] + {None: "", "compile": ", torch.compile",
                                   "cudagraphs": ", torch.compile + CUDA graphs",
                                   GRAPH: ", whole step in one CUDA graph"}[how]


#: Suite model names -> (timm name, extra create_model kwargs).
_MODELS = {
    "vit_b16": ("vit_base_patch16_224", {}),
    "deit_s": ("deit_small_patch16_224", {}),
    "vit_s16": ("vit_small_patch16_224", {}),
    # A 12-block ViT small enough for the test suite: 8x8 patches of 32 px images (N = 17).
    "tiny": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=48, depth=12, num_heads=3,
                                           num_classes=10)),
}
_LABELS = {"vit_b16": "ViT-B/16", "deit_s": "DeiT-S", "vit_s16": "ViT-S/16", "tiny": "tiny ViT"}


def model_label(name: str) -> str:
    """Human name of a suite model (``vit_b16`` -> ``ViT-B/16``)."""
    return _LABELS.get(name, name)


@dataclasses.dataclass
class SuiteConfig:
    """What one run of the suite measures, and how hard.

    Attributes:
        device: ``cpu`` or ``cuda``.
        quick: short run (fewer shapes and repetitions; < 3 min on 2 CPU cores).
        tiny: tiny models and shapes (for the test suite; figures are meaningless).
        compile: include ``torch.compile`` of the reference drop.
        budget_gib: the memory budget of the "largest batch that fits" figure.
    """

    device: str = "cpu"
    quick: bool = False
    tiny: bool = False
    compile: bool = True
    budget_gib: float = 4.0

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
        if not self.budget_gib > 0:
            raise ValueError(f"budget_gib must be > 0, got {self.budget_gib}")

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def op_dtype(self) -> torch.dtype:
        """dtype of the drop op's inputs: bf16 on CUDA, fp32 on CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    def autocast(self, cache: bool = True):
        """bf16 autocast on CUDA (``cache``: autocast's weight-cast cache); nothing on CPU
        (fp32)."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    # --- sizes --------------------------------------------------------------------------------
    @property
    def memory_model(self) -> str:
        """Model of the saved-memory / FLOP figures (the design anchors: ViT-B/16)."""
        return "tiny" if self.tiny else "vit_b16"

    @property
    def memory_batch(self) -> int:
        """Batch of the saved-memory / FLOP figures (anchors: 8; per image, so --quick uses 1)."""
        return 2 if self.tiny else (1 if self.quick and not self.cuda else 8)

    @property
    def time_model(self) -> str:
        """Model of the step-time figures: DeiT-S on CPU, ViT-B/16 on GPU."""
        return "tiny" if self.tiny else ("vit_b16" if self.cuda else "deit_s")

    @property
    def time_batch(self) -> int:
        if self.tiny:
            return 4
        if self.cuda:
            return 128
        return 4 if self.quick else 16

    @property
    def image_sizes(self) -> tuple[int, ...]:
        return (32, 48) if self.tiny else (224, 384)

    @property
    def reps(self) -> int:
        """Interleaved rounds of the big (train step) timings."""
        if self.tiny:
            return 2
        if self.cuda:
            return 10 if self.quick else 20
        return 2 if self.quick else 5

    def describe(self) -> dict:
        return dict(device=self.device, quick=self.quick, tiny=self.tiny, compile=self.compile,
                    budget_gib=self.budget_gib, memory_model=self.memory_model,
                    memory_batch=self.memory_batch, time_model=self.time_model,
                    time_batch=self.time_batch, image_sizes=list(self.image_sizes),
                    reps=self.reps, op_dtype=str(self.op_dtype),
                    precision="bf16 autocast" if self.cuda else "fp32")


def create_vit(name: str, img_size: Optional[int] = None, device: str = "cpu",
               seed: int = 0) -> nn.Module:
    """A random-init timm ViT by suite name (see ``_MODELS``), in train mode, on ``device``."""
    if name not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {name!r}")
    timm_name, kwargs = _MODELS[name]
    kwargs = dict(kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    elif name == "tiny":
        kwargs["img_size"] = 32
    torch.manual_seed(seed)
    return timm.create_model(timm_name, pretrained=False, **kwargs).to(device).train()


#: Suite variant -> (method of :mod:`bsr_kernels.methods`, its options).
_VARIANT_METHODS = {
    "full": ("full", {}),
    "linear_probe": ("linear", {}),
    "eager_bsr": ("eager_bsr", {}),
    "bsr_autograd": ("bsr", dict(memory_mode="autograd")),
    "bsr_lean": ("bsr", dict(memory_mode="lean")),
    "bsr_fast": ("bsr", dict(memory_mode="fast")),
    "bsr_lean_bf16": ("bsr", dict(memory_mode="lean", activation_dtype=torch.bfloat16)),
}


def build_variant(variant: str, model: nn.Module):
    """Sets ``model`` (a fresh timm ViT) up as one training variant (see :func:`split_variant`):
    a method of :mod:`bsr_kernels.methods` (BSR variants: the default blocks and drops for the
    depth) or the plain-PyTorch peer (:class:`benchmarks.peer_bsr.PeerBSR`), wrapped in
    ``torch.compile`` for ``+compile`` / ``+cudagraphs`` (``+graph`` is made by
    :func:`make_step`).

    Returns:
        ``(module, params)``: the module mapping images to logits and its trained parameters.
    """
    base, how = split_variant(variant)
    if base == "peer_bsr":
        from .peer_bsr import PeerBSR
        module = PeerBSR(model)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        name, options = _VARIANT_METHODS[base]
        method = methods.setup(model, name, **options)
        module, params = method.module, method.params
    if how in COMPILE_MODES:
        module = torch.compile(module, dynamic=False, **COMPILE_MODES[how])
    return module, params


def make_inputs(b: int, n: int, h: int, c: int, dtype: torch.dtype = torch.float32,
                device="cpu", requires_grad: bool = False, seed: int = 0,
                generator: Optional[torch.Generator] = None):
    """The benchmarks' one input builder for the drop op and attention: x (B, N, C) and q, k, v
    (B, H, N, C/H) views of one qkv tensor, as timm's Attention makes them.

    Drawn in float32 from ``generator`` (default: a generator on ``device`` seeded with ``seed``),
    then cast to ``dtype``. With ``requires_grad``, x and qkv are leaves that need grad.

    Returns:
        ``(x, q, k, v, qkv)``.
    """
    g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, device=device, dtype=torch.float32).to(dtype)
    qkv = torch.randn(b, n, 3, h, c // h, generator=g, device=device,
                      dtype=torch.float32).to(dtype)
    if requires_grad:
        x.requires_grad_()
        qkv.requires_grad_()
    return (x, *qkv_views(qkv), qkv)


def qkv_views(qkv: torch.Tensor):
    """q, k, v (B, H, N, d) as views of a (B, N, 3, H, d) qkv tensor, as timm's Attention makes
    them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def min_bytes(b: int, h: int, n: int, c: int, keep_rate: float = 0.5, p: int = 1,
              dtype: torch.dtype = torch.bfloat16, fused: Optional[bool] = None) -> int:
    """Bytes a token drop must move: read x, the q_cls rows and K; write x_out (prefix, kept and,
    when ``fused`` (default: when something is dropped), the fused row)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_keep = num_kept(keep_rate, n - p)
    if fused is None:
        fused = n_keep < n - p
    d = c // h
    read = b * n * c + b * h * d + b * h * n * d
    write = b * (p + n_keep + int(fused)) * c
    return (read + write) * itemsize


def make_step(module: nn.Module, params, images: torch.Tensor, labels: torch.Tensor,
              cfg: SuiteConfig, digest: bool = False, graph: bool = False
              ) -> Callable[[], None]:
    """One training step: forward (bf16 autocast on CUDA), cross-entropy, backward, AdamW (fused
    on CUDA). With ``digest``, the first call leaves :func:`step_digest` of its logits and
    gradients in ``step.first`` (compiled variants are checked against eager ones with it).
    With ``graph`` (CUDA), that step captured whole in one CUDA graph (:func:`_graphed_step`)."""
    if graph:
        return _graphed_step(module, params, images, labels, cfg, digest)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True if cfg.cuda else None)
    first: dict = {}

    def step():
        with cfg.autocast():
            logits = module(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        if digest and not first:
            first.update(step_digest(logits, params))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    step.first = first
    return step


def _graphed_step(module: nn.Module, params, images: torch.Tensor, labels: torch.Tensor,
                  cfg: SuiteConfig, digest: bool) -> Callable[[], None]:
    """:func:`make_step`'s step captured in one CUDA graph, as PyTorch's whole-network capture
    does it: three warm steps on a side stream (lazy initialisation, Triton compilation), then
    the parameters and the optimizer state are put back, so the first replay is the eager first
    step; the capture runs with the gradients unset, so the graph allocates and writes them; a
    call replays it. AdamW is fused and ``capturable``; autocast runs without its cast cache (a
    cache filled during capture would hold the graph's own buffers). ``step.peak_bytes``: the
    peak allocated during capture (replays allocate nothing, so a peak taken around a replay
    would miss the activations held in the graph's pool)."""
    if not cfg.cuda:
        raise ValueError("variant: +graph needs CUDA (the step is captured in a CUDA graph)")
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True, capturable=True)
    start = [p.detach().clone() for p in params]

    def body():
        with cfg.autocast(cache=False):
            logits = module(images)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        return logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
    del start, p0  # not counted in the capture's peak
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.cuda.graph(graph):
        logits = body()
    # replays allocate nothing; the step's memory is what the capture allocated (its pool)
    peak_bytes = torch.cuda.max_memory_allocated()
    first: dict = {}

    def step():
        graph.replay()
        if digest and not first:
            first.update(step_digest(logits, params))

    step.optimizer = opt
    step.first = first
    step.graph = graph
    step.peak_bytes = peak_bytes
    # a graph holds no reference to what it reads from outside its pool: the inputs, and the
    # module with its frozen weights, must live as long as the step
    step.keep = (module, images, labels, body)
    return step


def step_digest(logits: torch.Tensor, params) -> dict:
    """A training step's logits and a fixed random projection of each parameter's gradient:
    enough to compare two runs of a step (compiled and eager) without keeping the gradients."""
    g = torch.Generator(device="cpu").manual_seed(5)
    proj = []
    for p in params:
        r = torch.randn(p.numel(), generator=g).to(p.device)
        proj.append(float(p.grad.float().flatten() @ r) if p.grad is not None else 0.0)
    return {"logits": logits.detach().float().cpu().flatten().tolist(), "grad_proj": proj}


def digest_diff(a: dict, b: dict) -> dict:
    """Relative differences of two :func:`step_digest` results (``b`` the reference):
    ``{"logits_rel", "grad_proj_rel"}``."""
    def rel(x, y):
        x, y = torch.tensor(x), torch.tensor(y)
        return float((x - y).norm() / y.norm().clamp_min(1e-30))
    return {"logits_rel": rel(a["logits"], b["logits"]),
            "grad_proj_rel": rel(a["grad_proj"], b["grad_proj"])}


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def cuda_peak_step(step: Callable[[], None]) -> float:
    """Peak bytes allocated during one training step, after two warm steps (optimizer state
    exists), counting everything alive: parameters, gradients, optimizer state, activations."""
    step()
    step()
    free_memory("cuda")
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


@dataclasses.dataclass
class Target:
    """One target, its measured value and verdict.

    Attributes:
        name: what is checked.
        value: the measured figure.
        target: the bound, e.g. ``<= 10`` is ``("<=", 10)``.
        unit: unit of value and bound.
        where: the configuration it was measured on.
    """

    name: str
    value: Optional[float]
    op: str
    bound: float
    unit: str = ""
    where: str = ""

    @property
    def passed(self) -> Optional[bool]:
        if self.value is None:
            return None
        return {"<=": self.value <= self.bound, ">=": self.value >= self.bound}[self.op]

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[self.passed]

    def shown_value(self, percent: bool = False) -> str:
        """The value to 3 significant digits (``percent``: a fraction as a percentage, whole
        percents), or as many more digits as keep it on its verdict's side of the bound
        (0.4999 against >= 0.5 reads 0.4999, or 49.99%, not a passing-looking "0.5" or
        "50%")."""
        if self.value is None:
            return "n/a"
        scale, unit, spec = (100.0, "%", "f") if percent else (1.0, "", "g")
        for digits in range(0 if percent else 3, 10):
            text = f"{self.value * scale:.{digits}{spec}}"
            if dataclasses.replace(self, value=float(text) / scale).passed == self.passed:
                return text + unit
        return f"{self.value * scale!r}{unit}"

    def line(self) -> str:
        val = self.shown_value()
        return (f"{self.verdict}: {self.name}: {val} {self.unit} (target {self.op} "
                f"{self.bound:g} {self.unit}){' [' + self.where + ']' if self.where else ''}")

    def to_dict(self) -> dict:
        return dict(name=self.name, value=self.value, op=self.op, bound=self.bound,
                    unit=self.unit, where=self.where, verdict=self.verdict)


def shown_percent(fraction: float, bound: Optional[float] = None, op: str = ">=") -> str:
    """A fraction as a table's percentage, whole percents; with the ``op bound`` of a target on
    it, :meth:`Target.shown_value`'s rule: as many decimals as keep it on its verdict's side
    (0.4999 against >= 0.5 reads 49.99%, never "50%")."""
    if bound is None:
        return f"{100 * fraction:.0f}%"
    return Target("", fraction, op, bound).shown_value(percent=True)


def doc_summary(doc: str) -> str:
    """The first paragraph of a module docstring, on one line: a command's ``--help``
    description (its first line alone may stop mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def section_main(doc: str, run: Callable, table: Callable, argv=None, options=(),
                 config: Callable = lambda args: {}) -> dict:
    """The command line of one section module (``python -m benchmarks.bench_<x>``).

    Flags: ``--device``, ``--quick``, ``--json PATH`` and the module's own ``options``
    (``(flags, add_argument kwargs)`` pairs, turned into SuiteConfig fields by ``config``).
    Prints the section's table and its targets.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc_summary(doc))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the section to this JSON file")
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    section = run(SuiteConfig(device=args.device, quick=args.quick, tiny=args.tiny,
                              **config(args)))
    print(table(section))
    for t in section.get("targets", []):
        print(Target(**{k: t[k] for k in ("name", "value", "op", "bound", "unit",
                                          "where")}).line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(section, f, indent=1)
    return section


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: str) -> dict:
    """The machine, software versions and the device, for the results' header."""
    info = dict(cpu=_cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, bsr_kernels=bsr_kernels.__version__,
                backends=bsr_kernels.available_backends(device), git_commit=_git_commit(),
                platform=platform.platform())
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=props.total_memory / GIB, cuda=torch.version.cuda)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info
