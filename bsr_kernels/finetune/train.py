"""Training of ``bsr-finetune``: methods, optimizer, the epoch loop, checkpoints, DDP, timing.

* :func:`adapt` turns a timm ViT into one of the four methods (:mod:`bsr_kernels.methods`):
  ``full`` fine-tuning, a ``linear`` probe, ``bitfit`` (biases and head) and ``bsr``
  (:func:`bsr_kernels.reprogram`).
* :func:`fit` trains for some epochs, evaluates after each, and (with an output directory)
  writes a checkpoint per epoch atomically (:func:`bsr_kernels.checkpoint.atomic_write`).
  ``resume=True`` continues from it exactly: weights, optimizer, scheduler, RNG states and
  step; a resumed run may ask for more epochs than the checkpoint's run did. A non-finite
  training loss stops it at once (:class:`TrainingDivergedError`).
* DDP: :mod:`bsr_kernels.finetune.distributed` holds the process group
  (:func:`setup_distributed`, re-exported here) and the samplers; the batch size is global, and
  DDP averages the gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import methods
from ..checkpoint import atomic_write
from ..methods import trainable_parameters
from .data import DataBundle
from .distributed import (DistInfo, GlobalBatchSampler, ShardSampler, barrier,
                          setup_distributed, teardown_distributed)

__all__ = [
    "METHODS",
    "DEFAULT_LR",
    "DEMO_LR",
    "DistInfo",
    "setup_distributed",
    "teardown_distributed",
    "adapt",
    "trainable_parameters",
    "decays",
    "make_optimizer",
    "make_scheduler",
    "make_timm_scheduler",
    "SCHEDULES",
    "train_step",
    "AMP_MODES",
    "resolve_amp",
    "evaluate",
    "CheckpointError",
    "TrainingDivergedError",
    "save_checkpoint",
    "load_checkpoint",
    "FitOptions",
    "fit",
    "time_steps",
]

#: The methods ``bsr-finetune`` trains (:data:`bsr_kernels.methods.METHODS` without the eager
#: BSR baseline).
METHODS = tuple(m for m in methods.METHODS if m != "eager_bsr")
#: Backbone learning rate per method for pre-trained timm ViTs (the head trains at
#: ``head_lr_scale`` times it). Conventional starting points, not tuned here.
DEFAULT_LR = {"full": 1e-4, "linear": 1e-3, "bitfit": 1e-3, "bsr": 3e-4}
#: The same for the digits demo's small ViT, each tuned over 1e-4 .. 1e-1 (30 epochs, seed 0;
#: see the package notes): the small model and few steps want larger rates.
DEMO_LR = {"full": 1e-3, "linear": 3e-2, "bitfit": 1e-3, "bsr": 3e-3}
CHECKPOINT_FORMAT = "bsr-finetune-checkpoint"
CHECKPOINT_VERSION = 1


# --- methods and optimizer -----------------------------------------------------------------

def adapt(model: nn.Module, method: str, train_blocks: Optional[Sequence[int]] = None,
          drop_at: Optional[Sequence[int]] = None, keep_rate: float = 0.5,
          memory_mode: str = "lean", activation_dtype: Optional[torch.dtype] = None
          ) -> nn.Module:
    """Sets what trains (``requires_grad``) for ``method``; BSR also reprograms the model.

    The methods are :mod:`bsr_kernels.methods` (shared with the benchmarks); ``bsr-finetune``
    offers :data:`METHODS` of them.

    Args:
        model: a timm ``VisionTransformer``.
        method: "full" (everything), "linear" (head), "bitfit" (biases and head) or "bsr"
            (:func:`bsr_kernels.reprogram` with ``train_blocks``, ``drop_at``, ``keep_rate``).
        train_blocks, drop_at, keep_rate, memory_mode, activation_dtype: BSR settings
            (``None``: defaults), passed to :func:`bsr_kernels.reprogram`.

    Returns:
        The same model.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return methods.setup(model, method, train_blocks=train_blocks, drop_at=drop_at,
                         keep_rate=keep_rate, memory_mode=memory_mode,
                         activation_dtype=activation_dtype).module


def check_optimizer_name(opt: str) -> str:
    """``opt`` lower-cased if timm's optimizer registry knows it; ValueError naming --opt."""
    from timm.optim import list_optimizers

    names = list_optimizers()
    if not isinstance(opt, str) or opt.lower() not in names:
        raise ValueError(f"--opt must be a timm optimizer name such as adamw, sgd, lamb or "
                         f"adan (timm.optim.list_optimizers()), got {opt!r}")
    return opt.lower()


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` gets weight decay (the one rule of :func:`make_optimizer` and
    the multitask demo): weight matrices and kernels, not biases (also the MoE experts' stacked
    ``fc1_bias`` (E, H) and ``fc2_bias`` (E, C), which are 2-D), norms, position embeddings or
    tokens."""
    return (p.dim() >= 2 and not name.endswith("bias") and "pos_embed" not in name
            and "token" not in name)


def make_optimizer(model: nn.Module, lr: float, head_lr_scale: float = 10.0,
                   weight_decay: float = 0.05, opt: str = "adamw") -> torch.optim.Optimizer:
    """A timm optimizer (``timm.optim.create_optimizer_v2``, default AdamW) over the trainable
    parameters: the head at ``lr * head_lr_scale``, no weight decay on biases, norms and
    embeddings (:func:`decays`)."""
    from timm.optim import create_optimizer_v2

    opt = check_optimizer_name(opt)
    groups: dict = {}
    for name, p in trainable_parameters(model).items():
        head = name.startswith(("head.", "head_dist."))
        decay = decays(name, p)
        key = (head, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * (head_lr_scale if head else 1.0),
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return create_optimizer_v2([groups[k] for k in sorted(groups)], opt=opt, lr=lr,
                               weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    total, warm = max(1, total_steps), max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return _LambdaLR(optimizer, factor)


class _LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose ``load_state_dict`` also sets the optimizer's learning rates to the
    schedule's value at the loaded step (LambdaLR's does not: the optimizer's state keeps the
    saved run's rate). A run resumed with more --epochs, whose stretched schedule is at another
    value there, then takes its next step at its own rate, not at the old schedule's last one
    (0 at the end of a cosine); the same rate when the schedule is unchanged."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, base, f in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * f(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


#: ``--sched`` choices: ``cosine`` is the built-in per-step linear warm-up then cosine decay to
#: 0 (:func:`make_scheduler`); the others are timm's (``timm.scheduler.create_scheduler_v2``),
#: stepped per optimizer update.
SCHEDULES = ("cosine", "step", "multistep", "poly", "tanh")


class TimmStepScheduler:
    """A timm scheduler driven per optimizer update, after a linear warm-up of its own, with the
    ``step()`` / ``state_dict()`` / ``load_state_dict()`` of a torch LR scheduler (what
    :func:`fit` and its checkpoints use).

    Update ``t`` (from 0) runs at ``base * (t + 1) / warmup_steps`` while ``t < warmup_steps``,
    as :func:`make_scheduler`'s warm-up does, then at the timm schedule's value for update
    ``t - warmup_steps``: the warm-up is a prefix and the schedule starts at the full rate.
    (timm's own warm-up climbs to the schedule's value *at its end*, which for ``tanh`` with the
    warm-up as long as the run is 0: nothing trained.)"""

    def __init__(self, scheduler, warmup_steps: int = 0):
        self.scheduler, self.warmup_steps, self.num_updates = scheduler, int(warmup_steps), 0
        self._apply()

    def _apply(self) -> None:
        t = self.num_updates
        if t < self.warmup_steps:
            for group, base in zip(self.scheduler.optimizer.param_groups,
                                   self.scheduler.base_values):
                group[self.scheduler.param_group_field] = base * (t + 1) / self.warmup_steps
        else:
            self.scheduler.step_update(t - self.warmup_steps)

    def step(self) -> None:
        self.num_updates += 1
        self._apply()

    # The schedule is a function of its settings and the update count, so the count is the
    # whole state: a resumed run with more --epochs follows the new, longer schedule.
    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self._apply()


def make_timm_scheduler(optimizer: torch.optim.Optimizer, sched: str, total_steps: int,
                        warmup_steps: int, steps_per_epoch: int = 1) -> TimmStepScheduler:
    """timm's ``sched`` schedule per update, after a linear warm-up from 0 of ``warmup_steps``
    (see :class:`TimmStepScheduler`), over the ``total_steps - warmup_steps`` updates left.
    With E = ``total_steps // steps_per_epoch`` epochs: ``step`` decays by 10x every
    ``max(1, E // 3)`` epochs, ``multistep`` after ``max(1, E // 2)`` and ``max(1, 3E // 4)``
    epochs (counted from the warm-up's end), ``poly`` and ``tanh`` run to 0 at the end."""
    from timm.scheduler import create_scheduler_v2

    if sched not in SCHEDULES or sched == "cosine":
        raise ValueError(f"--sched must be one of {', '.join(SCHEDULES[1:])} for a timm "
                         f"scheduler, got {sched!r}")
    per = max(1, int(steps_per_epoch))
    total = max(1, int(total_steps))
    warm = max(0, min(int(warmup_steps), total))
    epochs = max(1, total // per)
    # In updates: one "epoch" of timm's is one update. timm's multistep decays at update m - 1
    # for a milestone m (the m-th update, from 1, already decayed), its step schedule at update
    # d: the milestones are one further so that both decay after their number of epochs.
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=max(1, total - warm), warmup_epochs=0, min_lr=0.0,
        decay_epochs=max(1, epochs // 3) * per,
        decay_milestones=[max(1, epochs // 2) * per + 1, max(1, 3 * epochs // 4) * per + 1],
        step_on_epochs=False, updates_per_epoch=1)
    return TimmStepScheduler(scheduler, warm)


#: ``torch.compile`` modes (``--torchcompile-mode``, ``FitOptions.compile_mode``), as timm's
#: ``train.py --torchcompile-mode`` takes them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: ``--amp`` choices: ``auto`` is bf16 autocast on CUDA and none on CPU; ``bf16`` asks for
#: bf16 autocast on either; ``off`` computes in the parameters' dtype.
AMP_MODES = ("auto", "bf16", "off")


def resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` (an :data:`AMP_MODES` name, a dtype or None) on
    ``device``; None for no autocast."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else None


#: ``--memory-mode`` of bsr-finetune: ``auto`` or one of reprogram's memory modes.
MEMORY_MODE_CHOICES = ("auto", "lean", "fast", "autograd")


def resolve_memory_mode(mode: str, device: torch.device, activation_dtype=None) -> str:
    """The memory mode ``mode`` (a :data:`MEMORY_MODE_CHOICES` name) stands for on ``device``.

    ``auto`` is ``"autograd"`` on CUDA, where it measured the fastest with memory to spare
    (ViT-B/16, B=128, bf16 autocast, H100, 2026-11-27: 23.0 ms a step against fast's 33.9 and
    lean's 34.5, eager; 17.2 against 19.4 and 20.5 with the step in one CUDA graph; 2.1 GiB above
    the resident model against lean's 1.05; benchmarks/results/2026-11-27-h100.md), and
    ``"lean"`` elsewhere (small devices: the least memory), and whenever ``activation_dtype``
    is given (it compresses what lean saves; autograd saves what autograd saves)."""
    if mode not in MEMORY_MODE_CHOICES:
        raise ValueError(f"--memory-mode must be one of {', '.join(MEMORY_MODE_CHOICES)}, "
                         f"got {mode!r}")
    if mode != "auto":
        return mode
    return "autograd" if device.type == "cuda" and activation_dtype is None else "lean"


def _autocast(device: torch.device, amp="auto"):
    dtype = resolve_amp(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
               amp="auto", loss_scale: float = 1.0) -> float:
    """One optimizer step on a batch; returns the loss.

    ``amp`` (see :func:`resolve_amp`): by default bf16 autocast on GPU, none on CPU. Under DDP,
    ``model`` is the wrapped model and the gradients are averaged over processes.
    ``loss_scale``: this process's images times the number of processes over the global
    batch's images. DDP averages the processes' gradients, so shares of unequal size (the
    short batch of a training set smaller than the batch: 8 and 7 images) would weight their
    images unequally (1/16 and 1/14); scaled, each image of the global batch weighs the same,
    and the mean of the processes' returned losses is the global batch's mean loss.
    """
    with _autocast(images.device, amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels) * loss_scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def _bar(iterable, desc: str, enabled: bool, total: Optional[int] = None, initial: int = 0):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False,
                dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, info: DistInfo, progress: bool = False,
             desc: str = "eval", amp="auto") -> tuple[float, float]:
    """Accuracy (0-1) and mean cross-entropy over the whole test set, summed over processes."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)   # correct, loss sum, count
    for images, labels in _bar(loader, desc, progress):
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        with _autocast(info.device, amp):
            logits = model(images).float()
        stats[0] += (logits.argmax(-1) == labels).sum()
        stats[1] += F.cross_entropy(logits, labels, reduction="sum")
        stats[2] += labels.numel()
    if info.distributed:
        dist.all_reduce(stats)
    n = max(1.0, stats[2].item())
    return stats[0].item() / n, stats[1].item() / n


# --- checkpoints ---------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that is corrupt, of another format, or of another run configuration."""


def seed_all(seed: int) -> None:
    """Seeds every generator a run draws from: torch (CPU and CUDA), Python's ``random`` (timm's
    augmentations draw from it) and NumPy's, as timm's train script does."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def restore_training_state(state: dict, model: nn.Module, optimizer, scheduler,
                           where: str) -> None:
    """Loads weights, optimizer, scheduler and RNG states from a checkpoint's ``state`` (one
    code path for every resumable run), naming ``where`` when they do not fit."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"--resume: checkpoint {where} does not fit this model or "
                              f"optimizer ({e})") from e
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])


class TrainingDivergedError(ValueError):
    """The training loss became NaN or infinite (learning rate too high, bad data...)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped :func:`fit` at a step boundary, after it saved the checkpoint
    (``signal``: the signal's number; ``saved``: the checkpoint written, or None)."""

    def __init__(self, signum: int, saved: Optional[Path]):
        super().__init__(signum, saved)
        self.signal, self.saved = signum, saved


class _StopRequests:
    """While active (main thread only), SIGTERM and SIGINT ask the training loop to stop at the
    next step boundary instead of killing it mid-step; a second one stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:   # the second request: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically (:func:`bsr_kernels.checkpoint.atomic_write`):
    a crash leaves either the old or the new file."""
    atomic_write(path, lambda tmp: torch.save(state, str(tmp)))


def load_checkpoint(path: Path, fingerprint: Optional[dict] = None,
                    extendable: Sequence[str] = (), normalize: Optional[dict] = None,
                    optional: Sequence[str] = (), epochs: Optional[int] = None) -> dict:
    """Reads a training checkpoint and checks that it belongs to this run.

    Args:
        path: the checkpoint file.
        fingerprint: the run settings that must match (model, method, data, schedule...).
        extendable: settings of ``fingerprint`` that may differ (``"epochs"``: a resumed run
            may train longer than the run that wrote the checkpoint).
        normalize: ``{setting: function}``: the saved and the current value of such a setting
            are compared as the function gives them (what they stand for: a default None and
            the value it resolves to are the same setting).
        optional: settings of ``fingerprint`` that checkpoints written before they were
            recorded lack: compared only when the checkpoint has them.
        epochs: the resuming run's ``--epochs``: a checkpoint that has trained more epochs, or
            was saved inside an epoch past them (its weights are no epoch's result), is refused.

    Raises:
        CheckpointError: if the file is missing, unreadable (corrupt, truncated), not a
            ``bsr-finetune`` checkpoint, written with other settings (each difference is
            named), or past ``epochs``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
        raise CheckpointError(f"--resume: checkpoint {path} is corrupt or unreadable "
                              f"({type(e).__name__}: {e}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume: {path} is not a bsr-finetune training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"--resume: {path} has checkpoint version {state.get('version')}, "
                              f"this bsr-finetune reads version {CHECKPOINT_VERSION}")
    missing = {"model", "optimizer", "scheduler", "rng", "epoch", "step"} - set(state)
    if missing:
        raise CheckpointError(f"--resume: checkpoint {path} lacks {', '.join(sorted(missing))}")
    if fingerprint is not None:
        saved, same = state.get("fingerprint", {}), normalize or {}
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items()
                 if k not in extendable and (k in saved or k not in optional)
                 and (same[k](saved.get(k)) != same[k](v) if k in same else saved.get(k) != v)]
        diffs += [f"{k}: checkpoint {saved[k]!r}, now unset" for k in saved
                  if k not in fingerprint]
        if diffs:
            raise CheckpointError(f"--resume: checkpoint {path} was written by a run with other "
                                  "settings (" + "; ".join(diffs) + "); rerun with the same "
                                  "options, or use another --out")
    if epochs is not None:
        done, partial = int(state["epoch"]), state.get("partial_epoch")
        if done > epochs:
            raise CheckpointError(f"--resume: checkpoint {path} has already trained {done} "
                                  f"epochs, more than --epochs {epochs}; pass --epochs {done} "
                                  "or more")
        if partial and done >= epochs:
            raise CheckpointError(f"--resume: checkpoint {path} was saved inside epoch "
                                  f"{done + 1} (after {partial['batches']} of its batches), "
                                  f"past --epochs {epochs}; pass --epochs {done + 1} or more "
                                  "to finish that epoch")
    return state


# --- the loop ------------------------------------------------------------------------------

@dataclasses.dataclass
class FitOptions:
    """How :func:`fit` trains.

    Attributes:
        epochs: passes over the training set.
        batch_size: global batch size (split over processes).
        lr: backbone learning rate; the head trains at ``lr * head_lr_scale``.
        head_lr_scale: head learning-rate multiplier (the BSR authors use 10).
        weight_decay: weight decay of matrices.
        opt: timm optimizer name (``timm.optim.list_optimizers()``).
        amp: mixed precision, one of :data:`AMP_MODES` (see :func:`resolve_amp`).
        sched: learning-rate schedule, one of :data:`SCHEDULES`.
        compile: train and evaluate through ``torch.compile`` of the (DDP-wrapped) model; the
            checkpoint still holds the plain model's state dict.
        compile_mode: ``torch.compile``'s ``mode`` with ``compile``, one of
            :data:`COMPILE_MODES` (None: torch's default). ``"reduce-overhead"`` replays CUDA
            graphs: a launch-bound step (BSR on a GPU) gains the most.
        warmup_epochs: linear warm-up length.
        workers: DataLoader worker processes.
        seed: seed of the shuffling and of torch's RNG.
        progress: show progress bars.
        log_interval: without progress bars, a plain line (step, loss, images/s) every this many
            training steps (0: none), readable in a log file.
        checkpoint: where to write the per-epoch checkpoint (None: none).
        save_every_steps: also write it every this many steps inside an epoch (0: at the end of
            each epoch only). SIGTERM and Ctrl-C (SIGINT) write it at the next step boundary
            too, then stop (:class:`TrainingInterrupted`).
        resume: continue from ``checkpoint`` when it exists, inside an epoch too; ``epochs``
            may exceed the checkpoint's (training is extended, the cosine schedule stretched to
            the new end).
        on_epoch: called on the main process after each epoch (and its checkpoint) with the
            history so far (a list of per-epoch dicts).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    head_lr_scale: float = 10.0
    weight_decay: float = 0.05
    opt: str = "adamw"
    amp: str = "auto"
    compile: bool = False
    compile_mode: Optional[str] = None
    sched: str = "cosine"
    warmup_epochs: float = 1.0
    workers: int = 0
    seed: int = 0
    progress: bool = False
    log_interval: int = 0
    checkpoint: Optional[Path] = None
    save_every_steps: int = 0
    resume: bool = False
    on_epoch: Optional[Callable[[list], None]] = None


def _ignore_stop_signals(worker_id: int, chained: Optional[Callable[[int], None]] = None
                         ) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT, which the main
    process turns into a stop at the next step boundary (:class:`_StopRequests`). A SIGTERM to
    the whole process group (SLURM's scancel, ``kill -TERM -PGID``) or a Ctrl-C in a terminal
    reaches the workers too, which would die of it and take the run with them before it saves.
    The workers still end with the main process. Then calls ``chained`` (another
    ``worker_init_fn``); the DataLoader's own seeding of the worker has run before."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if chained is not None:
        chained(worker_id)


def _loader(dataset, sampler, batch_size: Optional[int], workers: int, device,
            worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda",
              persistent_workers=False,
              worker_init_fn=functools.partial(_ignore_stop_signals, chained=worker_init_fn))
    if batch_size is None:
        return DataLoader(dataset, batch_sampler=sampler, **kw)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, **kw)


def fit(model: nn.Module, data: DataBundle, opts: FitOptions, info: DistInfo,
        fingerprint: Optional[dict] = None, log: Callable[[str], None] = print,
        name: str = "", normalize: Optional[dict] = None, optional: Sequence[str] = ()
        ) -> dict:
    """Trains ``model`` (already adapted) on ``data.train``, evaluating on ``data.test`` after
    every epoch.

    Args:
        model: the model, on ``info.device``, with ``requires_grad`` set by :func:`adapt`.
        data: train and test sets.
        opts: see :class:`FitOptions`.
        info: this process (from :func:`setup_distributed`).
        fingerprint: settings stored in, and checked against, the checkpoint.
        normalize, optional: how some of them compare (see :func:`load_checkpoint`).
        log: where per-epoch lines go (called on the main process only).
        name: label of the progress bars and log lines.

    Returns:
        dict with ``accuracy`` and ``test_loss`` (last epoch), ``history`` (one dict per epoch),
        ``train_time_s`` (this process's training wall time, evaluation excluded),
        ``median_step_time_s`` (median training step, data wait included; the table's step
        time is ``bsr-finetune``'s side-by-side timing instead), ``steps`` and
        ``resumed_from_epoch``.
    """
    if opts.compile_mode is not None and opts.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}, got "
                         f"{opts.compile_mode!r}")
    fingerprint = dict(fingerprint or {})
    train_sampler = GlobalBatchSampler(len(data.train), opts.batch_size, info.rank,
                                       info.world_size, seed=opts.seed, shuffle=True,
                                       drop_last=len(data.train) >= opts.batch_size)
    steps_per_epoch = len(train_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set is empty ({len(data.train)} images)")
    left_out = (len(data.train) - steps_per_epoch * opts.batch_size if train_sampler.drop_last
                else 0)
    if left_out and info.is_main:
        # Every step's batch is whole (the sampler drops the last, short one), and the sampler
        # reshuffles each epoch (seeded by --seed and the epoch): another sample is left out.
        plural = "es" if steps_per_epoch > 1 else ""
        log(f"{name}: {left_out} of {len(data.train)} training images are left out of each "
            f"epoch ({steps_per_epoch} whole batch{plural} of {opts.batch_size}; the last, "
            f"short batch is dropped); each epoch reshuffles, so a different sample is left "
            f"out each epoch")
    train_loader = _loader(data.train, train_sampler, None, opts.workers, info.device)
    eval_bs = max(1, opts.batch_size // info.world_size) * 2
    test_loader = _loader(data.test, ShardSampler(len(data.test), info.rank, info.world_size),
                          eval_bs, opts.workers, info.device)

    ddp_model = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda"
                        else None)
    if opts.compile:
        ddp_model = torch.compile(ddp_model, mode=opts.compile_mode)
    optimizer = make_optimizer(model, opts.lr, opts.head_lr_scale, opts.weight_decay, opts.opt)
    total = opts.epochs * steps_per_epoch
    # min() before round(): a huge --warmup-epochs (1e308) is "warm up for the whole run".
    warmup = int(round(min(opts.warmup_epochs * steps_per_epoch, total)))
    if opts.sched == "cosine":
        scheduler = make_scheduler(optimizer, total, warmup)
    else:
        scheduler = make_timm_scheduler(optimizer, opts.sched, total, warmup, steps_per_epoch)

    start_epoch, step, history, partial = 0, 0, [], None
    if opts.resume and opts.checkpoint is not None and Path(opts.checkpoint).exists():
        state = load_checkpoint(opts.checkpoint, fingerprint, extendable=("epochs",),
                                normalize=normalize, optional=optional, epochs=opts.epochs)
        restore_training_state(state, model, optimizer, scheduler, str(opts.checkpoint))
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), state["history"]
        partial = state.get("partial_epoch")
        if info.is_main:
            log(f"{name}: resumed from {opts.checkpoint} after epoch {start_epoch}"
                + (f" and {partial['batches']} batches of the next" if partial else "")
                + f" (step {step})")
    resumed_from = start_epoch

    def checkpoint_state(epoch_done: int, partial_epoch: Optional[dict] = None) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "fingerprint": fingerprint, "epoch": epoch_done, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history,
                **({"partial_epoch": partial_epoch} if partial_epoch else {})}

    step_times: list[float] = []
    train_time = 0.0
    with _StopRequests() as stop:
        for epoch in range(start_epoch, opts.epochs):
            skip = int(partial["batches"]) if partial else 0
            loss_sum, n_batches = (float(partial["loss_sum"]), skip) if partial else (0.0, 0)
            train_sampler.set_epoch(epoch, start=skip)
            ddp_model.train()
            t_epoch = time.perf_counter()
            batches = iter(train_loader)   # draws the workers' base seed from torch's RNG
            if partial:   # ... so the RNG of the interrupted step is set after it: exact
                _set_rng_state(state["rng"])
                partial = None
            bar = _bar(batches, f"{name} epoch {epoch + 1}/{opts.epochs}",
                       opts.progress and info.is_main, total=steps_per_epoch, initial=skip)
            for images, labels in bar:
                images = images.to(info.device, non_blocking=True)
                labels = labels.to(info.device, non_blocking=True)
                t0 = time.perf_counter()
                with overflow_diverges(optimizer, name, epoch, step):
                    loss = train_step(ddp_model, images, labels, optimizer, scheduler,
                                      amp=opts.amp, loss_scale=images.shape[0]
                                      * info.world_size / train_sampler.global_count(n_batches))
                if info.device.type == "cuda":
                    torch.cuda.synchronize(info.device)
                step_times.append(time.perf_counter() - t0)
                step += 1
                stopping, loss = _check_finite(loss, info, name, epoch, step, optimizer,
                                               opts.checkpoint, stop.signum is not None)
                loss_sum, n_batches = loss_sum + loss, n_batches + 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.3f}")
                elif (opts.log_interval and info.is_main and n_batches % opts.log_interval == 0
                      and n_batches < steps_per_epoch):
                    seen = (n_batches - skip) * images.shape[0] * info.world_size
                    log(f"{name} epoch {epoch + 1}/{opts.epochs} step {n_batches}/"
                        f"{steps_per_epoch}: loss {loss:.4f}, "
                        f"{seen / (time.perf_counter() - t_epoch):.1f} img/s")
                if n_batches == steps_per_epoch:   # the epoch's end saves (and stops) below
                    break
                every = opts.save_every_steps
                if stopping or (every and step % every == 0):
                    if info.is_main and opts.checkpoint is not None:
                        save_checkpoint(opts.checkpoint, checkpoint_state(
                            epoch, {"batches": n_batches, "loss_sum": loss_sum}))
                    barrier(info)
                if stopping:
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, opts.checkpoint)
            train_time += time.perf_counter() - t_epoch
            acc, test_loss = evaluate(ddp_model, test_loader, info,
                                      opts.progress and info.is_main, f"{name} eval",
                                      amp=opts.amp)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_batches),
                            "test_loss": test_loss, "accuracy": acc,
                            "lr": _base_lr(optimizer, opts.lr)})
            if info.is_main:
                log(f"{name} epoch {epoch + 1}/{opts.epochs}: train loss "
                    f"{history[-1]['train_loss']:.4f}, test loss {test_loss:.4f}, "
                    f"accuracy {100 * acc:.2f}%, {time.perf_counter() - t_epoch:.1f} s")
                if opts.checkpoint is not None:
                    save_checkpoint(opts.checkpoint, checkpoint_state(epoch + 1))
                if opts.on_epoch is not None:
                    opts.on_epoch(history)
            barrier(info)
            # A stop asked for at the epoch's last step or during its evaluation stops here,
            # after the epoch's checkpoint: the final epoch too (--resume finishes the method
            # from that checkpoint without training, and trains the next methods).
            if _any_process(info, stop.signum is not None)[0]:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, opts.checkpoint)

    last = history[-1] if history else {"accuracy": None, "test_loss": None}
    return {"accuracy": last["accuracy"], "test_loss": last["test_loss"], "history": history,
            "train_time_s": train_time,
            "median_step_time_s": statistics.median(step_times) if step_times else None,
            "steps": step, "resumed_from_epoch": resumed_from}


def _base_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The rate of the ``lr`` schedule (``FitOptions.lr``, the backbone's; the head's is
    ``head_lr_scale`` times it) now, whatever groups the method trains: ``param_groups[0]`` is
    the head's for ``linear`` (no backbone group) and a backbone group's for ``full``. Every
    group follows the same schedule from its ``initial_lr`` (both schedulers set it), so the
    value is ``lr`` times any group's ratio."""
    groups = optimizer.param_groups
    for g in groups:   # a group at the base rate itself: its rate exactly
        if g.get("initial_lr") == lr:
            return float(g["lr"])
    for g in groups:
        if g.get("initial_lr"):
            return float(lr * g["lr"] / g["initial_lr"])
    return float(groups[0]["lr"])


def _rates_text(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's distinct rates now, lowest first, for a message: "learning rate 0.001",
    or "learning rates 0.001, 0.01" with the backbone's and the head's (``head_lr_scale`` times
    it). Not ``param_groups[0]`` alone: that is the head's for ``linear``, a backbone group's
    for the others."""
    rates = sorted({float(g["lr"]) for g in optimizer.param_groups})
    if len(rates) == 1:
        return f"learning rate {rates[0]:.3g}"
    return "learning rates " + ", ".join(f"{r:.3g}" for r in rates)


def _process_sums(info: DistInfo, *values: float) -> tuple[float, ...]:
    """Each of ``values`` (bools count 1) summed over the processes: one all-reduce under DDP,
    in float64."""
    if not info.distributed:
        return tuple(float(v) for v in values)
    summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(summed)
    return tuple(summed.tolist())


def _any_process(info: DistInfo, *flags: bool) -> tuple[bool, ...]:
    """Each of ``flags``, true when it is true on any process (one all-reduce under DDP)."""
    return tuple(v > 0 for v in _process_sums(info, *flags))


@contextlib.contextmanager
def overflow_diverges(optimizer, name: str, epoch: int, step: int):
    """Turns an optimizer step that overflows float32 (AdamW's step size lr / (1 - beta1) past
    it: "value cannot be converted to type float without overflow") into
    :class:`TrainingDivergedError`, naming the learning rate; ``epoch`` and ``step`` 0-based."""
    try:
        yield
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        raise TrainingDivergedError(
            f"{name + ': ' if name else ''}the optimizer step overflowed float32 at step "
            f"{step + 1} (epoch {epoch + 1}, {_rates_text(optimizer)}: {e}); training stopped "
            "and this step was not saved. Lower --lr (or --head-lr-scale) and start again") from e


def _check_finite(loss: float, info: DistInfo, name: str, epoch: int, step: int,
                  optimizer: torch.optim.Optimizer, checkpoint: Optional[Path],
                  stop: bool = False) -> tuple[bool, float]:
    """Raises :class:`TrainingDivergedError` on every process when any process's loss is not
    finite (before any checkpoint of this step, so the last one on disk holds finite weights).

    Returns whether any process was asked to stop (``stop``) and the step's loss averaged over
    the processes, as DDP averages their gradients (the global batch's loss: the shares are
    equal, and the one short batch of a training set smaller than the batch, whose shares may
    differ by an image, is weighted by :func:`train_step`'s ``loss_scale``). Every process then
    sums the same values: the history, the logs and a mid-epoch checkpoint hold that loss, as
    timm reports it, not the main process's share. One all-reduce per step."""
    bad, stop, total = _process_sums(info, not math.isfinite(loss), stop, loss)
    if not bad:
        return stop > 0, total / info.world_size
    kept = (f"; the checkpoint {checkpoint} holds the training from before"
            if checkpoint is not None and Path(checkpoint).exists() else "")
    raise TrainingDivergedError(
        f"{name + ': ' if name else ''}the training loss became {loss} at step {step} (epoch "
        f"{epoch + 1}, {_rates_text(optimizer)}); training stopped and this step was not "
        f"saved{kept}. Lower --lr (or --head-lr-scale) and start again")


def time_steps(models: dict, images: torch.Tensor, labels: torch.Tensor, rounds: int = 10,
               warmup: int = 2, amp="auto") -> dict:
    """Median training-step time of several models measured side by side (A B A B ...).

    Each model takes a full step (forward, backward, AdamW update) with learning rate 0, so its
    weights do not change.

    Args:
        models: ``{name: model}`` with ``requires_grad`` set.
        images, labels: one batch, on the models' device.
        rounds: timed rounds; each round times every model once, in turn.
        warmup: untimed rounds first.
        amp: mixed precision (see :func:`resolve_amp`).

    Returns:
        ``{name: median seconds per step}``.
    """
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0,
                                 weight_decay=0.0) for k, m in models.items()}
    times: dict = {k: [] for k in models}
    cuda = images.device.type == "cuda"
    for r in range(warmup + rounds):
        for k, m in models.items():
            m.train()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(m, images, labels, opts[k], amp=amp)
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    for m in models.values():
        for p in m.parameters():
            p.grad = None
    return {k: statistics.median(v) for k, v in times.items()}
