"""``bsr-finetune --multitask``: the Mixture-of-Experts multitask demo, offline.

Three tasks share one backbone, the shipped digits ViT (pre-trained on digits 0-4), and are all
built from the digits it has never seen, 5-9 (scikit-learn's ``load_digits``, on disk):

* ``digit``: which of 5, 6, 7, 8, 9 (5 classes): fine shape detail;
* ``parity``: odd or even (2 classes): groups {5, 7, 9} and {6, 8}, which look nothing alike;
* ``ge7``: is the digit >= 7 (2 classes): groups {7, 8, 9} against {5, 6}, a third partition.

They share the low-level features (strokes of the same images) but each needs a different
partition of them, so a per-task gate has something to choose: the MoE multitask setting of the
BSR paper in miniature. Methods (each trained round-robin over the tasks, one optimizer step per
task batch):

* ``moe_full``: MoE in the default train blocks (3, 7, 11), everything trained;
* ``bsr_moe``: the same MoE model under BSR (``reprogram``: blocks 3, 7, 11 with their experts and
  gates, the final norm and the heads train; tokens dropped in 3, 6, 9);
* ``bsr_dense``: BSR on the dense model (no MoE), the same heads;
* ``linear``: a linear probe per task (frozen backbone).

``--out DIR`` writes ``args.json`` (the command line), ``summary.json``
(``methods.<m>.mean_accuracy``, ``methods.<m>.tasks.<t>.accuracy``,
``methods.<m>.saved_activation_mib_per_image``, GFLOPs and step time), ``report.png`` (accuracy
per task and method, memory, and the task x expert usage of every MoE block) and per method a
resumable checkpoint (each epoch) and a delta checkpoint (trained parameters: experts, gates,
heads), every file atomically. As in ``bsr-finetune``, a folder that holds a run is refused
unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given, one process at a time
writes it (``DIR/.lock``), and ``--out`` is checked before anything is loaded. Exit status: 0; 2
on a usage or input error; 3 when the training loss became NaN or infinite (nothing of that
epoch is saved); 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..checkpoint import atomic_write
from . import cli
# bsr-finetune's flag parsers and help formatter: one definition of each check and message
from .cli import (_HelpFormatter, _keep_rate, _nonneg_float, _nonneg_int, _positive_float,
                  _positive_int, _seed)
from .data import data_kind
from .train import MEMORY_MODE_CHOICES

__all__ = ["TASKS", "METHODS", "build_parser", "run", "main", "build_method"]

#: task name -> (number of classes, label of a digit 5..9, description)
TASKS = {
    "digit": (5, lambda d: d - 5, "which digit, 5-9"),
    "parity": (2, lambda d: d % 2, "odd or even"),
    "ge7": (2, lambda d: (d >= 7).long(), "digit >= 7"),
}
METHODS = ("moe_full", "bsr_moe", "bsr_dense", "linear")
#: Backbone learning rate per method (the heads train at 10x), from the single-task demo's
#: tuned rates: full fine-tuning 1e-3, BSR 3e-3, linear probe 3e-2.
LR = {"moe_full": 1e-3, "bsr_moe": 3e-3, "bsr_dense": 3e-3, "linear": 3e-2}
DEFAULT_EPOCHS = 12
_LABELS = {"moe_full": "MoE full fine-tuning", "bsr_moe": "BSR-MoE",
           "bsr_dense": "dense multitask BSR", "linear": "linear probe per task"}
_COLORS = {"moe_full": "#4c72b0", "bsr_moe": "#55a868", "bsr_dense": "#dd8452",
           "linear": "#8c8c8c"}


def _methods(s: str) -> tuple:
    names = tuple(dict.fromkeys(t.strip().lower() for t in s.split(",") if t.strip()))
    if s.strip().lower() == "all":
        return METHODS
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must be one or more of {', '.join(METHODS)} "
                                         f"(comma-separated) or all, got {s!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``bsr-finetune --multitask`` argument parser (``bsr-finetune``'s flag checks and
    help formatter: a default is shown unless the help states it)."""
    p = argparse.ArgumentParser(
        prog="bsr-finetune --multitask",
        description="Multitask Mixture-of-Experts BSR on the offline digits tasks (digit 5-9, "
                    "parity, >= 7) with the shipped digits ViT: MoE full fine-tuning, BSR-MoE, "
                    "dense multitask BSR and a linear probe per task.",
        formatter_class=_HelpFormatter)
    p.add_argument("--task", action="append", default=None, metavar="NAME=DATA",
                   help="a task from real data (repeat for each task): DATA an ImageFolder "
                        "directory or a torchvision set name (as --data of bsr-finetune); "
                        "default: the embedded digits tasks digit, parity, ge7")
    cli.add_model_options(p)
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="download folder of torchvision sets (default: $BSR_DATA or "
                        "~/.cache/bsr_kernels/data)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="backbone learning rate (default per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in LR.items()) + ")")
    p.add_argument("--method", type=_methods, default=METHODS,
                   help=f"{'|'.join(METHODS)}, comma-separated, or all (default: all)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                   help="passes over the training images (each pass steps every task)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="images of one task per optimizer step (split over torchrun "
                        "processes)")
    p.add_argument("--experts", type=_positive_int, default=16,
                   help="experts per MoE block (moe_full, bsr_moe)")
    p.add_argument("--top-k", type=_positive_int, default=4,
                   help="experts per token, at most --experts")
    p.add_argument("--noise-std", type=_nonneg_float, default=0.0,
                   help="std of the noise added to the gate logits in training")
    p.add_argument("--aux-loss-weight", type=_nonneg_float, default=0.0,
                   help="weight of the cv^2 load-balancing loss")
    p.add_argument("--keep-rate", type=_keep_rate, default=0.5,
                   help="BSR (bsr_moe, bsr_dense): fraction of patch tokens kept at each drop, "
                        "in (0, 1]")
    p.add_argument("--memory-mode", choices=MEMORY_MODE_CHOICES, default="auto",
                   help="BSR: what backward stores. lean: the least (recomputes the rest); "
                        "fast: also the projections (recomputes no matmul); autograd: what "
                        "plain autograd stores (the most memory, the fastest on a GPU). The "
                        "same gradients in all of them. auto (default): autograd on CUDA, lean "
                        "elsewhere, as in bsr-finetune")
    p.add_argument("--head-lr-scale", type=_positive_float, default=10.0,
                   help="the task heads train at this multiple of the backbone learning rate")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.05,
                   help="weight decay of weight matrices (not biases, norms, embeddings)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the weights of new layers (gates, heads), the shuffling and "
                        "the augmentation")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--profile-batch", type=_positive_int, default=8,
                   help="images in the batch that measures memory and FLOPs")
    p.add_argument("--timing-rounds", type=_nonneg_int, default=8,
                   help="rounds of side-by-side step timing (0: skip)")
    p.add_argument("--threads", type=_nonneg_int, default=1,
                   help="torch CPU threads (0: as many as torch picks); the width-64 digits "
                        "model's ops are too small to gain from more, and on shared cores extra "
                        "OpenMP threads made the demo many times slower")
    p.add_argument("--max-train-images", type=_positive_int, default=None,
                   help="train on only N training images of each task (quick checks; "
                        "the first N of the digits tasks, a random N of a --task's, drawn "
                        "with --seed: an image folder is in class order; default: all)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write args.json, summary.json, report.png, and per method "
                        "checkpoint.pt (each epoch) and delta.safetensors; a folder holding a "
                        "run needs --resume or --overwrite (default: write nothing)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue a run: PATH is its --out folder or one of its "
                        "<method>/checkpoint.pt; bare --resume continues --out (finished "
                        "methods retrain no epoch). Options not given are the run's own (its "
                        "args.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its files are deleted once the data "
                        "and the model have loaded and every method is set up)")
    return p


# --- models and optimizer ------------------------------------------------------------------

def build_method(base: nn.Module, method: str, num_classes: Sequence[int], experts: int = 16,
                 top_k: int = 4, noise_std: float = 0.0, aux_loss_weight: float = 0.0,
                 keep_rate: float = 0.5, memory_mode: str = "lean") -> nn.Module:
    """A :class:`bsr_kernels.MultiTaskViT` of a copy of ``base`` set up for ``method``."""
    from ..moe import MultiTaskViT, to_moe
    from ..reprogram import reprogram

    vit = copy.deepcopy(base)
    if method in ("moe_full", "bsr_moe"):
        to_moe(vit, num_experts=experts, top_k=top_k, num_tasks=len(num_classes),
               noise_std=noise_std, aux_loss_weight=aux_loss_weight)
    mt = MultiTaskViT(vit, list(num_classes))
    if method in ("bsr_moe", "bsr_dense"):
        reprogram(mt, keep_rate=keep_rate, memory_mode=memory_mode, train_norm=True)
    elif method == "linear":
        for name, p in mt.named_parameters():
            p.requires_grad_(name.startswith("heads."))
    return mt


def _optimizer(model: nn.Module, lr: float, head_lr_scale: float, weight_decay: float):
    """AdamW: the task heads at ``lr * head_lr_scale``; weight decay by
    :func:`bsr_kernels.finetune.train.decays` (not on biases, the experts' included)."""
    from .train import decays

    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith("heads.")
        decay = decays(name, p)
        g = groups.setdefault((head, decay), {"params": [], "lr": lr * (head_lr_scale if head
                                                                          else 1.0),
                                              "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
    return torch.optim.AdamW([groups[k] for k in sorted(groups)], lr=lr)


@dataclasses.dataclass
class Task:
    """One task: its datasets (items ``(image, label)``), classes, and how a dataset label
    becomes the task's label (the digits tasks share one dataset of digits 5-9)."""

    name: str
    num_classes: int
    train: Dataset
    test: Dataset
    label_fn: Callable[[torch.Tensor], torch.Tensor]
    description: str


def digits_tasks(img_size: int, mean, std) -> list[Task]:
    """The embedded tasks (:data:`TASKS`) on scikit-learn's digits 5-9."""
    from .data import DIGITS_TARGET_CLASSES, digits_split

    train, test = digits_split(DIGITS_TARGET_CLASSES, img_size, mean, std,
                               max_shift=img_size // 8)
    return [Task(name, c, train, test, (lambda y, fn=fn: fn(y + 5).long()), desc)
            for name, (c, fn, desc) in TASKS.items()]


def data_tasks(specs: Sequence[str], img_size: int, mean, std, root=None) -> list[Task]:
    """Tasks from ``NAME=DATA`` specs, DATA an ImageFolder directory or a torchvision set
    name (see ``bsr-finetune --data``)."""
    from .data import build_data

    tasks, seen = [], set()
    for spec in specs:
        name, sep, data = spec.partition("=")
        if not sep or not name or not data:
            raise ValueError(f"--task must be NAME=DATA (DATA a directory or a dataset name), "
                             f"got {spec!r}")
        if name in seen:
            raise ValueError(f"--task {spec}: task name {name!r} given twice")
        seen.add(name)
        bundle = build_data(data, img_size, mean, std, root)
        tasks.append(Task(name, bundle.num_classes, bundle.train, bundle.test,
                          lambda y: y.long(), f"{bundle.name}, {bundle.num_classes} classes"))
    return tasks


def _random_subset(ds: Dataset, n: int, seed: int) -> tuple[Dataset, str]:
    """``n`` images of ``ds`` drawn at random, the same for the same ``seed`` (a resumed run
    trains on the images it started with), and how they were drawn. Not the first ``n``: an
    ImageFolder lists its images class by class, so those would be of the first classes only."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return (torch.utils.data.Subset(ds, sorted(idx.tolist())),
            f"random {n} of {len(ds)}, seed {seed}")


def _batches(ds: Dataset, batch_size: int, limit: Optional[int] = None):
    """(images, labels) batches of ``ds`` in order (tensor slices for tensor datasets)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    images = getattr(ds, "images", None)
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        if images is not None and not getattr(ds, "max_shift", 0):
            yield images[i:j], ds.labels[i:j]
        else:
            items = [ds[k] for k in range(i, j)]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _first(task: Task, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(_batches(task.test, n, n))
    return x.to(device), task.label_fn(y).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, tasks: Sequence[Task], device, batch_size: int = 256
             ) -> list[float]:
    """Accuracy (0-1) of every task on its test set."""
    model.eval()
    out = []
    for t, task in enumerate(tasks):
        correct = total = 0
        for x, y in _batches(task.test, batch_size):
            logits = model(x.to(device), t)
            correct += (logits.argmax(-1) == task.label_fn(y).to(device)).sum().item()
            total += y.numel()
        out.append(correct / max(1, total))
    return out


@torch.no_grad()
def expert_usage(model: nn.Module, tasks: Sequence[Task], device, limit: int = 512) -> dict:
    """``{block: (tasks, E) fractions}``: how often each task routes to each expert on (up to
    ``limit`` of) its test images; each row sums to 1."""
    from ..moe import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        return {}
    model.eval()
    for _, m in blocks:
        m.usage.zero_()
        m.track_usage = True
    try:
        for t, task in enumerate(tasks):
            for x, _ in _batches(task.test, 256, limit):
                model(x.to(device), t)
    finally:
        for _, m in blocks:
            m.track_usage = False
    return {i: (m.usage / m.usage.sum(1, keepdim=True).clamp_min(1)).tolist() for i, m in blocks}


def train(model: nn.Module, tasks: Sequence[Task], epochs: int, batch_size: int, lr: float,
          head_lr_scale: float, weight_decay: float, seed: int, device, log=print,
          name: str = "", checkpoint: Optional[Path] = None, resume: bool = False,
          fingerprint: Optional[dict] = None, info=None) -> dict:
    """Round-robin training: for each batch position, one optimizer step per task, each task
    on its own shuffle of its training images (a task with fewer batches cycles).

    With ``checkpoint``, the state (weights, optimizer, scheduler, RNGs, history) is written
    after every epoch, atomically; ``resume`` continues from it exactly, and may ask for more
    ``epochs`` than the run that wrote it (the learning-rate schedule then follows ``epochs``;
    fewer than the checkpoint has trained is refused). Under ``torchrun``
    (``info.distributed``) every process takes its share of each global batch and DDP averages
    the gradients (other tasks' heads and gates are unused in a step); a short batch (a task
    with fewer training images than ``batch_size``) is cycled to a multiple of the number of
    processes, as torch's ``DistributedSampler`` pads, so that every process has images.

    A NaN or infinite loss stops the training at that step (:class:`TrainingDivergedError`,
    raised on every process), before the epoch's checkpoint is written."""
    from .train import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, DistInfo, _check_finite,
                        _rng_state, load_checkpoint, make_scheduler, overflow_diverges,
                        restore_training_state, save_checkpoint)

    n_batches = [max(1, len(t.train) // batch_size) for t in tasks]
    positions = max(n_batches)
    steps_per_epoch = positions * len(tasks)
    opt = _optimizer(model, lr, head_lr_scale, weight_decay)
    sched = make_scheduler(opt, epochs * steps_per_epoch, steps_per_epoch)
    info = info if info is not None else DistInfo(device=torch.device(device))
    rank, world = info.rank, info.world_size
    main_proc = rank == 0
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)
    gen = torch.Generator().manual_seed(seed)
    history, step_times, t_train, start, step = [], [], 0.0, 0, 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint, fingerprint, extendable=("epochs",), epochs=epochs)
        restore_training_state(state, model, opt, sched, str(checkpoint))
        gen.set_state(state["generator"])
        start, step, history = int(state["epoch"]), int(state["step"]), state["history"]
        t_train = float(state.get("train_time_s", 0.0))
        if main_proc:
            log(f"{name}: resumed from {checkpoint} after epoch {start}")
    for epoch in range(start, epochs):
        model.train()
        perms = [torch.randperm(len(t.train), generator=gen) for t in tasks]
        t0, loss_sum = time.perf_counter(), 0.0
        for b in range(positions):
            for t, task in enumerate(tasks):
                bb = b % n_batches[t]
                batch = perms[t][bb * batch_size:(bb + 1) * batch_size]
                if len(batch) % world:   # short (fewer images than batch_size): cycle it to a
                    need = -(-len(batch) // world) * world   # multiple of the processes, as
                    batch = batch[torch.arange(need) % len(batch)]   # DistributedSampler pads
                idx = batch[rank::world].tolist()
                items = [task.train[i] for i in idx]      # with the training augmentation
                x = torch.stack([im for im, _ in items]).to(device)
                y = task.label_fn(torch.tensor([lab for _, lab in items])).to(device)
                ts = time.perf_counter()
                loss = _loss(model, ddp_model(x, t), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with overflow_diverges(opt, name, epoch, step):
                    opt.step()
                sched.step()
                step_times.append(time.perf_counter() - ts)
                value = loss.item()
                step += 1
                loss_sum += _check_finite(value, info, name, epoch, step, opt, checkpoint)[1]
        t_train += time.perf_counter() - t0
        acc = evaluate(model, tasks, device)
        names = [t.name for t in tasks]
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
                        "accuracy": dict(zip(names, acc))})
        if main_proc:
            log(f"{name} epoch {epoch + 1}/{epochs}: loss {history[-1]['train_loss']:.4f}, "
                + ", ".join(f"{k} {100 * a:.1f}%" for k, a in zip(names, acc)))
        if checkpoint is not None and main_proc:
            save_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "fingerprint": dict(fingerprint or {}), "epoch": epoch + 1, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(),
                "generator": gen.get_state(), "history": history, "train_time_s": t_train})
    return {"history": history, "train_time_s": t_train,
            "median_step_time_s": (sorted(step_times)[len(step_times) // 2] if step_times
                                   else None), "resumed_from_epoch": start}


def _loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy, plus the MoE blocks' auxiliary (load-balancing) loss
    of the forward that made ``logits`` when ``--aux-loss-weight`` asks for one."""
    loss = F.cross_entropy(logits, labels)
    aux = model.aux_loss()
    return loss if aux is None else loss + aux


# --- the run -------------------------------------------------------------------------------

def run(args: argparse.Namespace, log=print, info=None, warn=None) -> dict:
    """Trains and measures every method; returns the summary dict.

    The arguments that need nothing loaded are checked, and ``--out`` claimed
    (:func:`cli._prepare_out`), before any data or weights are loaded; ``warn`` gets the warnings
    (main process; default: nowhere)."""
    t_start = time.perf_counter()
    warn = warn or (lambda s: None)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if info is None:
        from .train import DistInfo
        info = DistInfo(device=torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                                            else "cpu")))
    if not info.is_main:
        log = (lambda *a, **k: None)
    # --resume [PATH]: options not given are the run's own, as in bsr-finetune --resume
    taken = cli._resolve_resume(args, warn, METHODS, multitask=True)
    if taken:
        log(f"--resume: as the run was started: {' '.join(taken)}")
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes ({info.world_size})")
    from .models import check_model_name
    check_model_name(args.model)
    cli.check_weight_options(args)
    # options that none of the chosen methods or tasks would use are refused, as bsr-finetune
    # refuses them
    sets = [spec.partition("=")[2] for spec in args.task or ()]
    cli.refuse_unused_options(set(getattr(args, "given", ())), [
        (("keep_rate", "memory_mode"), bool({"bsr_moe", "bsr_dense"} & set(args.method)),
         "--method bsr_moe or bsr_dense"),
        (("experts", "top_k", "noise_std", "aux_loss_weight"),
         bool({"moe_full", "bsr_moe"} & set(args.method)), "--method moe_full or bsr_moe"),
        (("data_root",), any(d and data_kind(d) == "torchvision" for d in sets),
         "--task NAME=DATA with a torchvision set (their download folder)"),
        cli.out_options_rule(args)])
    # after the rule above: --experts alone with no MoE method is named as unused, not as
    # too few for the default --top-k
    if args.top_k > args.experts:
        raise ValueError(f"--top-k ({args.top_k}) must not exceed --experts ({args.experts})")
    # --resume: the methods left out named, a finished one without its checkpoint refused
    cli.check_resumed_methods(args, info, args.method, METHODS, warn)
    # checked and claimed as bsr-finetune does: not a file, writable, locked, holding no run
    # of these methods without --resume/--overwrite, args.json written
    with cli.claimed_out(args, info, warn, METHODS) as lock:
        return _run(args, log, info, warn, t_start, lock)


def _run(args: argparse.Namespace, log, info, warn, t_start: float, lock) -> dict:
    from ..profile import profile
    from .data import TensorImageDataset
    from .models import build_model, check_patch_fit, model_input_config
    from .train import resolve_memory_mode, seed_all, time_steps

    device = info.device
    memory_mode = resolve_memory_mode(args.memory_mode, device)   # what auto stands for here
    img_size, mean, std = model_input_config(args.model, args.img_size)
    check_patch_fit(args.model, img_size)
    if args.task:
        tasks = data_tasks(args.task, img_size, mean, std, args.data_root)
    else:
        tasks = digits_tasks(img_size, mean, std)
    subsets = {}   # task -> how its training images were cut (in the checkpoint fingerprint)
    if args.max_train_images is not None:
        n = args.max_train_images
        for task in tasks:
            if isinstance(task.train, TensorImageDataset) and n < len(task.train):
                task.train = TensorImageDataset(task.train.images[:n], task.train.labels[:n],
                                                task.train.max_shift)
            elif n < len(task.train):
                task.train, subsets[task.name] = _random_subset(task.train, n, args.seed)
    num_classes = [t.num_classes for t in tasks]
    seed_all(args.seed)
    base, minfo = build_model(args.model, 1, args.img_size, args.pretrained, args.checkpoint)
    log(f"bsr-finetune --multitask: {args.model} ({minfo['weights']}), {img_size} px; tasks "
        + ", ".join(f"{t.name} ({t.num_classes} classes: {t.description}; {len(t.train)} train "
                    f"/ {len(t.test)} test images)" for t in tasks)
        + f"; methods {', '.join(args.method)}; {args.epochs} epochs; {args.experts} experts, "
        f"top-{args.top_k}")
    cli.set_up_each(args.method, lambda m: build_method(
        base, m, num_classes, args.experts, args.top_k, args.noise_std, args.aux_loss_weight,
        args.keep_rate, memory_mode))
    if args.out is not None and info.is_main:
        cli._delete_replaced(Path(args.out), lock, warn)

    models, results = {}, {}
    for method in args.method:
        lr = args.lr if args.lr is not None else LR[method]
        seed_all(args.seed)
        model = build_method(base, method, num_classes, args.experts, args.top_k,
                             args.noise_std, args.aux_loss_weight, args.keep_rate,
                             memory_mode).to(device)
        fp = {"method": method, "model": args.model, "weights": minfo["weights"],
              "tasks": [[t.name, t.num_classes, t.description, len(t.train)] for t in tasks],
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
              "experts": args.experts, "top_k": args.top_k, "noise_std": args.noise_std,
              "aux_loss_weight": args.aux_loss_weight, "keep_rate": args.keep_rate,
              "memory_mode": memory_mode, "head_lr_scale": args.head_lr_scale,
              "weight_decay": args.weight_decay, "seed": args.seed}
        if subsets:   # absent otherwise: checkpoints of runs on whole tasks still resume
            fp["train_subsets"] = subsets
        ckpt = args.out / method / "checkpoint.pt" if args.out is not None else None
        res = train(model, tasks, args.epochs, args.batch_size, lr, args.head_lr_scale,
                    args.weight_decay, args.seed, device, log=log, name=method,
                    checkpoint=ckpt, resume=args.resume, fingerprint=fp, info=info)
        acc = res["history"][-1]["accuracy"]
        res.update({"mean_accuracy": sum(acc.values()) / len(acc),
                    "tasks": {t.name: {"accuracy": acc[t.name], "num_classes": t.num_classes}
                              for t in tasks},
                    "lr": lr,
                    "trainable_params": sum(p.numel() for p in model.parameters()
                                            if p.requires_grad),
                    "total_params": sum(p.numel() for p in model.parameters())})
        usage = expert_usage(model, tasks, device)
        if usage:
            res["expert_usage"] = {str(k): v for k, v in usage.items()}
        models[method], results[method] = model, res

    summary_meta = {"world_size": info.world_size}
    if not info.is_main:    # measuring and writing are the main process's
        return {"methods": results, **summary_meta}
    # memory, FLOPs (a batch of the first task) and side-by-side step time
    x0, y0 = _first(tasks[0], args.profile_batch, device)
    for method, model in models.items():
        model.set_task(0)
        model.train()   # a training step (evaluation left it in eval mode): gate noise and the
        # aux loss, which make the MoE blocks run under plain autograd, are on, and counted
        prof = profile(model, x0, y0, loss_fn=lambda logits, y, m=model: _loss(m, logits, y))
        results[method].update({k: prof[k] for k in (
            "saved_activation_mib_per_image", "train_gflops_per_image",
            "forward_gmacs_per_image", "tokens_per_block")})
    if args.timing_rounds > 0:
        x, y = _first(tasks[0], args.batch_size, device)
        # amp=None: the multitask loop trains in float32 (no autocast), on CUDA too
        times = time_steps(models, x, y, rounds=args.timing_rounds, amp=None)
        for method, t in times.items():
            results[method]["step_time_s"] = t
            if "moe_full" in times:
                results[method]["step_time_vs_moe_full"] = t / times["moe_full"]

    summary = {"methods": results,
               "tasks": {t.name: {"num_classes": t.num_classes, "description": t.description}
                         for t in tasks},
               "model": args.model, "weights": minfo["weights"], "img_size": img_size,
               "data": "digits 5-9" if not args.task else list(args.task),
               "epochs": args.epochs, "batch_size": args.batch_size, "experts": args.experts,
               "top_k": args.top_k, "keep_rate": args.keep_rate,
               "memory_mode": memory_mode, "seed": args.seed, "device": str(device),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               **summary_meta, "wall_time_s": time.perf_counter() - t_start}
    log("")
    log(format_table(results))
    if args.out is not None:
        from .report import write_summary
        path = write_summary(args.out / "summary.json", results,
                             {k: v for k, v in summary.items() if k != "methods"})
        _save_deltas(models, args.out, [t.name for t in tasks])
        try:
            png = draw_report(args.out / "report.png", results)
        except ImportError as e:
            png = None
            print(f"bsr-finetune: no PNG report ({e})", file=sys.stderr)
        log(f"\nwrote {path}" + (f" and {png}" if png else ""))
    log(f"wall time {summary['wall_time_s']:.1f} s")
    return summary


def _save_deltas(models: dict, out: Path, tasks: Sequence[str]) -> None:
    from ..delta import save_delta
    for method, model in models.items():
        save_delta(model, out / method / "delta.safetensors",
                   extra={"method": method, "tasks": list(tasks)})


def format_table(results: dict) -> str:
    """One row per method: per-task and mean accuracy, memory, FLOPs, step time."""
    names = list(next(iter(results.values()))["tasks"]) if results else []
    head = ["method", *names, "mean", "saved MiB/img", "train GFLOP/img", "step ms",
            "vs moe_full", "trained params"]
    rows = []
    for m, r in results.items():
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        rows.append([_LABELS.get(m, m),
                     *(f"{100 * r['tasks'][t]['accuracy']:.1f} %" for t in names),
                     f"{100 * r['mean_accuracy']:.1f} %",
                     f(r.get("saved_activation_mib_per_image"), ".3f"),
                     f(r.get("train_gflops_per_image"), ".4f"),
                     f(None if r.get("step_time_s") is None else 1e3 * r["step_time_s"], ".1f"),
                     f(r.get("step_time_vs_moe_full"), ".2f"),
                     f(r.get("trainable_params"), ",d")])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def draw_report(path: Path, results: dict) -> Path:
    """Accuracy per task and method, saved memory per method, and task x expert heat maps of
    every MoE block of every MoE method; written atomically
    (:func:`bsr_kernels.checkpoint.atomic_write`), so a failed or killed write leaves an
    earlier report whole."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(results)
    maps = [(m, b, torch.tensor(u)) for m in methods
            for b, u in results[m].get("expert_usage", {}).items()]
    n_cols = max(3, max((sum(1 for mm, _, _ in maps if mm == m) for m in methods), default=0))
    map_rows = sorted({m for m, _, _ in maps}, key=methods.index)
    fig = plt.figure(figsize=(4.0 * n_cols, 3.4 * (1 + len(map_rows))), constrained_layout=True)
    gs = fig.add_gridspec(1 + len(map_rows), n_cols)
    ax = fig.add_subplot(gs[0, :2])
    names = list(results[methods[0]]["tasks"])
    groups = [*names, "mean"]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [100 * results[m]["tasks"][t]["accuracy"] for t in names]
        vals.append(100 * results[m]["mean_accuracy"])
        ax.bar([g + i * width for g in range(len(groups))], vals, width,
               label=_LABELS.get(m, m), color=_COLORS.get(m, "#999"))
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy per task", fontsize=10)
    ax = fig.add_subplot(gs[0, 2])
    vals = [results[m].get("saved_activation_mib_per_image") or 0.0 for m in methods]
    bars = ax.bar(range(len(methods)), vals, color=[_COLORS.get(m, "#999") for m in methods])
    ax.set_xticks(range(len(methods)), methods, fontsize=8)
    ax.set_title("saved activations (MiB / image)", fontsize=10)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    for r, m in enumerate(map_rows):
        for c, (_, block, u) in enumerate([x for x in maps if x[0] == m]):
            ax = fig.add_subplot(gs[1 + r, c])
            im = ax.imshow(u.numpy(), aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("expert")
            ax.set_title(f"{_LABELS.get(m, m)}: block {block} expert usage", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"bsr-finetune --multitask: {len(names)} tasks on one backbone", fontsize=11)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``bsr-finetune --multitask``; returns the exit status: 0, 2 on a usage or
    input error, 3 (:data:`cli.EXIT_DIVERGED`) when the training loss became NaN or infinite,
    130 when interrupted (Ctrl-C)."""
    from .train import setup_distributed, teardown_distributed

    prog = "bsr-finetune --multitask"
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = cli.given_options(parser, argv)   # --resume takes the rest from args.json
    args.argv = ["--multitask", *argv]   # args.json: the command line bsr-finetune takes
    try:
        info = setup_distributed(args.device)

        def warn(s: str) -> None:
            if info.is_main:
                print(f"{prog}: warning: {s}", file=sys.stderr, flush=True)

        run(args, log=lambda s: print(s, flush=True), info=info, warn=warn)
    except cli.RUN_ERRORS as e:
        return cli.exit_status(prog, e, args.out)
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
