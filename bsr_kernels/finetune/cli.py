"""The ``bsr-finetune`` command line.

With no arguments it runs the built-in demo, offline: a 12-block ViT shipped pre-trained on
digits 0-4 is adapted to digits 5-9 (scikit-learn's ``load_digits``, upscaled) by full
fine-tuning, a linear probe, BitFit and BSR, and a table compares test accuracy, saved
activation memory, training FLOPs and step time. ``--out DIR`` also writes ``args.json``,
``summary.json``, ``summary.csv`` (one row per method and epoch), ``report.png``, and per
method a resumable checkpoint, ``result.json`` and a delta checkpoint, every file atomically.

A folder that holds a run is refused unless ``--resume`` (continue it, possibly with more
``--epochs``) or ``--overwrite`` (replace it) is given, and one process at a time writes it
(a lock file ``DIR/.lock``, taken over when its process has died).

Examples::

    bsr-finetune                                            # the digits demo, all methods
    bsr-finetune --out runs/demo                            # ... and keep the results
    bsr-finetune --resume runs/demo --epochs 40             # continue it, 10 epochs more
    bsr-finetune --model vit_base_patch16_224 --pretrained --data cifar10 --method bsr \\
        --epochs 10 --batch-size 128 --workers 8 --out runs/c10
    torchrun --nproc_per_node 4 -m bsr_kernels.finetune --data /data/pets --method bsr ...
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint import RunLock, atomic_write, clean_orphans, read_json, write_json
from ..config import check_blocks, default_drop_at, default_train_blocks
from .data import (BAD_IMAGE_MODES, TORCHVISION_SETS, DatasetUnavailableError, build_data,
                   data_kind)
from .models import (DIGITS_MODEL, WeightsUnavailableError, build_model, check_model_name,
                     check_patch_fit, model_data_config)
from .report import draw_report, format_table, write_history_csv, write_summary
from .train import (DEFAULT_LR, DEMO_LR, METHODS, CheckpointError, DistInfo, FitOptions,
                    AMP_MODES, COMPILE_MODES, MEMORY_MODE_CHOICES, SCHEDULES,
                    TrainingDivergedError,
                    TrainingInterrupted, adapt, check_optimizer_name, fit,
                    load_checkpoint, resolve_amp, resolve_memory_mode, seed_all,
                    setup_distributed,
                    teardown_distributed, time_steps, trainable_parameters)

__all__ = ["build_parser", "main", "run", "DEMO_EPOCHS"]

#: Epochs of the built-in digits demo, and of other data.
DEMO_EPOCHS, OTHER_EPOCHS = 30, 10
#: Random-shift augmentation of the digits training images, in original (8 x 8) pixels.
DIGITS_SHIFT = 1


_ACTIVATION_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULT_FORMAT, ARGS_FORMAT = "bsr-finetune-result", "bsr-finetune-args"
#: Exit status when the training loss became NaN/inf (2 is a usage or input error).
EXIT_DIVERGED = 3


# --- argument parsing ----------------------------------------------------------------------

def _number(kind: type, ok, requirement: str, name: str):
    """An argparse ``type``: parses ``kind`` (int or float) and checks ``ok(value)``; a finite
    number is required. ``requirement`` completes the message "must be ..."."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {requirement}, got {s!r}") from None
        if not (math.isfinite(v) and ok(v)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {requirement}, got {s}")
        return v
    parse.__name__ = name  # argparse names the type in its "invalid <name> value" message
    return parse


_positive_int = _number(int, lambda v: v >= 1, "of at least 1", "positive int")
_nonneg_int = _number(int, lambda v: v >= 0, "of 0 or more", "int")
#: The largest float32: a learning rate (or its head multiple) above it overflows the
#: optimizer's float32 arithmetic.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_positive_float = _number(float, lambda v: 0 < v <= FLOAT32_MAX,
                          f"above 0 and at most {FLOAT32_MAX:.4g} (the largest float32)",
                          "positive float")
_nonneg_float = _number(float, lambda v: v >= 0, "of 0 or more", "float")
_seed = _number(int, lambda v: 0 <= v < 2**32, "from 0 to 4294967295 (2**32 - 1)", "seed")
_keep_rate = _number(float, lambda v: 0.0 < v <= 1.0,
                     "in (0, 1] (the fraction of patch tokens each drop keeps; 1 keeps all)",
                     "keep rate")


def _blocks(s: str) -> tuple:
    if s.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(t) for t in s.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated block indices such as 3,7,11 (or none), got {s!r}") from None


def _methods(s: str) -> tuple:
    names = tuple(t.strip().lower() for t in s.split(",") if t.strip())
    if s.strip().lower() == "all":
        return METHODS
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"must be one or more of {', '.join(METHODS)} (comma-separated) or all, got {s!r}")
    return tuple(dict.fromkeys(names))


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help, unless the help already states its default or
    there is none to state (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_model_options(g) -> None:
    """The options that choose the model and its starting weights (both modes of bsr-finetune):
    --model, --pretrained, --checkpoint, --img-size."""
    g.add_argument("--model", default=DIGITS_MODEL,
                   help=f"timm ViT name, or {DIGITS_MODEL} (the shipped digits 0-4 model); as in "
                        "timm, hf-hub:ORG/REPO (a Hugging Face hub repo) or local-dir:PATH (a "
                        "folder with timm's config.json and weights)")
    g.add_argument("--pretrained", action="store_true",
                   help="start from the model's own weights: timm hub weights (needs a network "
                        "or the hub cache), or a local-dir: folder's")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="start from a local checkpoint (safetensors, timm or bsr-finetune)")
    g.add_argument("--img-size", type=_positive_int, default=None,
                   help="input side in pixels (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    """The ``bsr-finetune`` argument parser."""
    p = argparse.ArgumentParser(
        prog="bsr-finetune",
        description="Fine-tune a timm ViT by Block Selective Reprogramming (train a few blocks, "
                    "drop the least attended tokens) and compare it with full fine-tuning, a "
                    "linear probe and BitFit. Without arguments: the offline digits demo.",
        formatter_class=_HelpFormatter)
    add_model_options(p.add_argument_group("model"))
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help=f"digits, {', '.join(TORCHVISION_SETS)}, or an ImageFolder directory")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="download folder of torchvision sets (default: $BSR_DATA or "
                        "~/.cache/bsr_kernels/data)")
    g.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader workers")
    g.add_argument("--bad-images", choices=BAD_IMAGE_MODES, default="error",
                   help="ImageFolder images that cannot be read (every file is decoded at "
                        "start-up): error stops and lists them, skip trains without them and "
                        "says how many (default: error)")
    g = p.add_argument_group("method")
    g.add_argument("--method", type=_methods, default=None,
                   help=f"{'|'.join(METHODS)}, a comma-separated list, or all (default: all for "
                        "the digits demo, bsr otherwise)")
    g.add_argument("--train-blocks", type=_blocks, default=None,
                   help="BSR: blocks to train, 0-based, e.g. 3,7,11 (default for a depth d: "
                        "round(d/3*k)-1 for k=1..3, i.e. 3,7,11 at d=12)")
    g.add_argument("--drop-at", type=_blocks, default=None,
                   help="BSR: blocks that drop tokens, 0-based, e.g. 3,6,9, or none (default for a "
                        "depth d: round(d/4*k) for k=1..3, i.e. 3,6,9 at d=12)")
    g.add_argument("--keep-rate", type=_keep_rate, default=0.5,
                   help="BSR: fraction of patch tokens kept at each drop, in (0, 1]")
    g.add_argument("--memory-mode", choices=MEMORY_MODE_CHOICES, default="auto",
                   help="BSR: what backward stores. lean: the least (recomputes the rest); "
                        "fast: also the projections (recomputes no matmul); autograd: what "
                        "plain autograd stores (the most memory, the fastest on a GPU; compiles "
                        "best, see --torchcompile). The same gradients in all of them. auto "
                        "(default): autograd on CUDA (on an H100, 1.5x lean's speed for 2.1 "
                        "GiB of activations against 1.05), lean on CPU or with "
                        "--activation-dtype (--multitask takes the same modes)")
    g.add_argument("--activation-dtype", choices=("bfloat16", "float16"), default=None,
                   help="BSR: store the saved activations in this dtype (compressed, "
                        "approximate gradients; default: the compute dtype, exact)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"epochs (default: {DEMO_EPOCHS} for digits, {OTHER_EPOCHS} otherwise)")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="global batch size (split over torchrun processes)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="backbone learning rate (default per method, for the digits model: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEMO_LR.items())
                        + "; for other models: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--head-lr-scale", type=_positive_float, default=10.0,
                   help="the head trains at this multiple of --lr (the BSR authors use 10)")
    g.add_argument("--opt", default="adamw", metavar="NAME", type=str.lower,
                   help="optimizer, any timm.optim name (adamw, sgd, lamb, adan, ...)")
    g.add_argument("--sched", choices=SCHEDULES, default="cosine",
                   help="learning-rate schedule per step: cosine is linear warm-up then cosine "
                        "decay to 0; step (x0.1 every E//3 epochs of E, counted from the "
                        "warm-up's end), multistep (x0.1 after E//2 and 3E//4 epochs), poly and "
                        "tanh are timm.scheduler's, with the same warm-up (default: cosine)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.05,
                   help="weight decay of weight matrices (not biases, norms, embeddings)")
    g.add_argument("--warmup-epochs", type=_nonneg_float, default=1.0,
                   help="linear learning-rate warm-up, in epochs (may be fractional; longer "
                        "than the run means warm-up throughout), then the --sched schedule")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed of the weights of new layers, the shuffling and the "
                        "augmentation")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    g.add_argument("--torchcompile", action="store_true",
                   help="train and evaluate through torch.compile (compiling takes a while; "
                        "the step-time measurement stays eager)")
    g.add_argument("--torchcompile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile's mode, with --torchcompile (default: torch's). On an "
                        "H100, reduce-overhead (CUDA graphs) trained BSR autograd mode at 14.6 "
                        "ms a step against 30.4 eager: the eager step is bound by launches")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="mixed precision: auto is bf16 autocast on CUDA and none on CPU; bf16 "
                        "asks for it on either; off computes in float32 (default: auto)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write args.json, summary.json, summary.csv, report.png, and per "
                        "method checkpoint.pt (each epoch), result.json, delta.safetensors and "
                        "delta.json; a folder holding a run needs --resume or --overwrite "
                        "(default: write nothing)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue a run: PATH is its --out folder or one of its "
                        "<method>/checkpoint.pt; bare --resume continues --out. Options not "
                        "given are the run's own (its args.json). Finished methods are kept; "
                        "a larger --epochs trains them further")
    g.add_argument("--save-every-steps", type=_nonneg_int, default=0, metavar="N",
                   help="with --out, also write the checkpoint every N training steps inside an "
                        "epoch (default 0: at the end of each epoch). SIGTERM and Ctrl-C always "
                        "write it at the next step boundary, then stop (exit 128+signal); "
                        "--resume continues from that step (bitwise with --workers 0)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its files are deleted once the data "
                        "and the model have loaded and every method is set up)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--log-interval", type=_nonneg_int, default=50, metavar="N",
                   help="without progress bars (a log file, --no-progress), print the step, "
                        "loss and images/s every N training steps (0: epoch lines only)")
    g.add_argument("--profile-batch", type=_positive_int, default=8,
                   help="images in the batch that measures memory and FLOPs")
    g.add_argument("--timing-rounds", type=_nonneg_int, default=10,
                   help="rounds of side-by-side step timing (0: skip)")
    g.add_argument("--samples", type=_nonneg_int, default=4,
                   help="sample images in the kept-token picture")
    p.add_argument("--multitask", action="store_true", help="run the multitask MoE demo instead "
                   "(its own options: bsr-finetune --multitask --help)")
    return p


# --- the run -------------------------------------------------------------------------------

def _fingerprint(args, method: str, num_classes: int, img_size: int, lr: float,
                 device: torch.device) -> dict:
    """The settings a checkpoint must share with the run resuming it. The options added after
    checkpoint version 1 (--opt, --sched, --amp) are recorded only when not at their default,
    so that older checkpoints still resume."""
    fp = _settings(args, method, num_classes, img_size, lr)
    if args.opt != "adamw":
        fp["opt"] = args.opt
    if args.sched != "cosine":
        fp["sched"] = args.sched
    amp = resolve_amp(args.amp, device)
    if amp != resolve_amp("auto", device):
        fp["amp"] = str(amp).replace("torch.", "")
    return fp


#: What a checkpoint records of the data beyond --data (a path whose folder may change):
#: the train and test sizes, and the classes. Checkpoints written before lack it.
DATA_IDENTITY = ("data_images", "data_classes")


def _data_identity(data) -> dict:
    """The :data:`DATA_IDENTITY` settings of ``data`` (a DataBundle). Images added to a folder
    change the held-out split too, so resuming over them would test on trained images."""
    import hashlib
    # A folder name that is not UTF-8 (b'caf\xe9') is a str with a lone surrogate: hashed as
    # its bytes on disk (os.fsencode), the same hash as before for every other name.
    names = hashlib.sha256("\n".join(map(str, data.classes)).encode(
        "utf-8", "surrogateescape")).hexdigest()[:12]
    return {"data_images": [len(data.train), len(data.test)],
            "data_classes": f"{len(data.classes)} classes, sha256 {names}"}


def _json_names(classes) -> list:
    r"""``classes`` for a JSON file: a name that is not valid UTF-8 (a folder b'caf\xe9', read as
    the str 'caf\udce9') would write a lone surrogate, which strict JSON readers refuse; its
    undecodable bytes are written as ``\xe9`` instead ('caf\xe9'). Other names, and the
    digits' int classes, are kept as they are."""
    return [c.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if isinstance(c, str) else c for c in classes]


def _settings(args, method: str, num_classes: int, img_size: int, lr: float) -> dict:
    return {"model": args.model, "weights": "hub" if args.pretrained else
            (str(args.checkpoint) if args.checkpoint else "default"),
            "data": str(args.data), "num_classes": num_classes, "img_size": img_size,
            "method": method, "train_blocks": list(args.train_blocks) if method == "bsr" and
            args.train_blocks is not None else None,
            "drop_at": list(args.drop_at) if method == "bsr" and args.drop_at is not None
            else None, "keep_rate": args.keep_rate if method == "bsr" else None,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
            "head_lr_scale": args.head_lr_scale, "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs, "seed": args.seed,
            "activation_dtype": args.activation_dtype if method == "bsr" else None}


def _resolved_blocks(depth: int) -> dict:
    """How --resume compares the BSR blocks of a checkpoint (``normalize`` of
    :func:`load_checkpoint`): as reprogram resolves them for a model of ``depth`` blocks, so
    that the default (None) and the blocks it stands for, or the same blocks in another order,
    are the same setting."""
    def resolve(name: str, default):
        def blocks(value):
            try:
                return check_blocks(name, default(depth) if value is None else value, depth)
            except ValueError:   # not blocks of this model: compared as they are
                return value
        return blocks
    return {"train_blocks": resolve("train_blocks", default_train_blocks),
            "drop_at": resolve("drop_at", default_drop_at)}


def _unnormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.cpu() * s + m).clamp(0, 1)


def _first_batch(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


#: Options about where a run executes rather than what it computes, and the bookkeeping of
#: args.json: ``--resume`` does not take them from the earlier run.
_NOT_RESUMED = ("out", "resume", "overwrite", "device", "workers", "progress", "log_interval",
                "multitask", "given", "argv", "earlier_argv", "memory_mode_used",
                "chosen_earlier")


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The options (``dest`` names) that ``argv`` gives, as opposed to those left at their
    defaults: argparse sets a default only where the namespace has no value yet."""
    unset = object()
    # append/count actions add to the value already there: they start from None instead
    adding = {a.dest for a in parser._actions
              if isinstance(a, (argparse._AppendAction, argparse._AppendConstAction,
                                argparse._CountAction))}
    ns = argparse.Namespace(**{a.dest: None if a.dest in adding else unset
                               for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return sorted(k for k, v in vars(ns).items()
                  if v is not unset and not (k in adding and v is None))


def _flag(name: str) -> str:
    """The command-line flag of an argparse destination: ``keep_rate`` -> ``--keep-rate``."""
    return "--" + name.replace("_", "-")


def _refuse_unused(names: Sequence[str], where: str) -> None:
    """Raises a ValueError naming the options ``names`` (argparse destinations), if any, that
    would do nothing here: they apply to ``where``."""
    if names:
        raise ValueError(f"{', '.join(_flag(n) for n in names)}: "
                         f"{'apply' if len(names) > 1 else 'applies'} to {where}")


def refuse_unused_options(given: set, rules: Sequence[tuple[Sequence[str], bool, str]]) -> None:
    """The one rule of either mode for options that would do nothing: for each rule
    ``(names, used, where)`` whose options this run does not use, a ValueError naming those of
    ``names`` (argparse destinations) in ``given`` (the options on the command line): they
    apply to ``where``."""
    for names, used, where in rules:
        if not used:
            _refuse_unused([n for n in names if n in given], where)


def out_options_rule(args: argparse.Namespace, names: Sequence[str] = ("overwrite",)) -> tuple:
    """The rule of :func:`refuse_unused_options` of either mode for options about the run in
    --out (``names``: argparse destinations), which do nothing without --out."""
    return (tuple(names), args.out is not None, "a run written with --out DIR")


def check_weight_options(args: argparse.Namespace) -> None:
    """The starting-weight options of either mode (:func:`add_model_options`): ValueError
    naming them when --pretrained and --checkpoint are both given, or --pretrained with the
    shipped digits model, which has its own weights."""
    if args.pretrained and args.checkpoint is not None:
        raise ValueError("--pretrained and --checkpoint both choose the starting weights: "
                         "pass one of them")
    if args.pretrained and args.model == DIGITS_MODEL:
        _refuse_unused(["pretrained"], f"timm models (--model {DIGITS_MODEL} starts from its "
                       "shipped weights)")


def _take_earlier_options(args: argparse.Namespace, run_dir: Path, warn,
                          methods: Sequence[str] = METHODS, multitask: bool = False) -> list[str]:
    """``--resume``: every option the command line leaves out is the earlier run's (its
    args.json), so ``bsr-finetune --resume DIR`` continues that run as it was started: the same
    methods, epochs, data and settings. Returns the options taken, as ``--name value``.

    Raises:
        ValueError: naming --resume, when the run there is of the other mode (``--multitask``
            or not), whose options do not apply.
    """
    given = getattr(args, "given", None)
    path = run_dir / "args.json"
    if given is None:   # run() called without main()
        return []
    if not path.is_file():   # a run writes args.json first; its method folders come next
        if not any((run_dir / m).is_dir() for m in methods):
            raise ValueError(f"--resume {run_dir}: no run to resume there (no args.json, no "
                             f"method folder); start one with --out {run_dir}")
        return []
    record = read_json(path, "the options of the run to resume",
                       "pass the run's options on the command line", format=ARGS_FORMAT,
                       versions=(1,))
    earlier, taken = record.get("args", {}), []
    if ("experts" in earlier) != multitask:   # only the multitask parser has --experts
        kind, add = ("a --multitask run", "add") if not multitask else ("a single-task run",
                                                                          "leave out")
        raise ValueError(f"--resume {run_dir}: the run there is {kind}; {add} --multitask to "
                         f"resume it (bsr-finetune {'--multitask ' * (not multitask)}--resume "
                         f"{run_dir})")
    # the options a user chose for this run, on its command line or on an earlier one (a
    # resumed run's args.json records them beside its own "given")
    chosen = set(earlier.get("given", ())) | set(earlier.get("chosen_earlier", ()))
    args.chosen_earlier = sorted(chosen - set(given))
    for name, value in earlier.items():
        if name in given or name in _NOT_RESUMED or not hasattr(args, name):
            continue
        if name == "memory_mode" and "given" in earlier and name not in chosen:
            continue   # a default (runs before --memory-mode auto stored lean): this one applies
        value = tuple(value) if isinstance(value, list) else value   # JSON has no tuples
        if getattr(args, name) != value:
            setattr(args, name, value)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            taken.append(f"{_flag(name)} {shown}")
    args.earlier_argv = [*record.get("earlier_argv", []), record.get("argv")]
    epochs = earlier.get("epochs")
    if "epochs" in given and epochs is not None and args.epochs != epochs:
        warn(f"--epochs {args.epochs}: the run was started for {epochs} epochs; the "
             f"learning-rate schedule now follows {args.epochs}")
    return taken


def _resolve_resume(args: argparse.Namespace, warn, methods: Sequence[str] = METHODS,
                    multitask: bool = False) -> list[str]:
    """Turns ``--resume [PATH]`` into ``args.resume`` (bool) and ``args.out`` (the run folder),
    and takes the options not given from the earlier run (:func:`_take_earlier_options`, whose
    list it returns); ``methods`` and ``multitask`` are the mode's (``bsr-finetune
    --multitask`` passes its own)."""
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in "
                         "--out, or replace it")
    if not args.resume:
        args.resume = False
        return []
    if args.resume is True:
        if args.out is None:
            raise ValueError("--resume needs --out (the folder holding the checkpoints), or "
                             "name that folder: --resume DIR")
        return _take_earlier_options(args, Path(args.out), warn, methods, multitask)
    from .multitask import METHODS as MULTITASK_METHODS
    p = Path(args.resume).expanduser()
    if p.is_dir():
        run_dir = p
    # either mode's method folder: a checkpoint of the other mode's run gets that refusal
    elif p.is_file() and p.name == "checkpoint.pt" \
            and p.parent.name in (*METHODS, *MULTITASK_METHODS):
        run_dir = p.parent.parent
    elif p.exists():
        raise ValueError(f"--resume {p}: expected the --out folder of an earlier run or one of "
                         "its <method>/checkpoint.pt files")
    else:
        raise ValueError(f"--resume {p}: no such run folder or checkpoint file")
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise ValueError(f"--resume {p} continues that run in its own folder {run_dir}; drop "
                         f"--out {args.out}, or pass --out {run_dir}")
    args.out, args.resume = run_dir, True
    return _take_earlier_options(args, run_dir, warn, methods, multitask)


def _check_amp(amp: str, device: torch.device) -> None:
    """Refuses an autocast dtype that BSR's kernels cannot run on ``device`` (tried on a tiny
    reprogrammed model, forward and backward), naming --amp."""
    dtype = resolve_amp(amp, device)
    if dtype is None:
        return
    from timm.models.vision_transformer import VisionTransformer

    from ..reprogram import reprogram
    from .train import _autocast
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = reprogram(VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=4,
                                            num_heads=2, num_classes=2)).to(device)
        try:
            with _autocast(device, dtype):
                out = probe(torch.randn(2, 3, 16, 16, device=device))
            out.float().sum().backward()
        except (TypeError, RuntimeError, ValueError, NotImplementedError) as e:
            raise ValueError(f"--amp {amp}: bsr_kernels cannot run BSR under "
                             f"{str(dtype).replace('torch.', '')} autocast on {device.type} "
                             f"({type(e).__name__}: {e}); use --amp off"
                             + (" or a GPU" if device.type == "cpu" else "")) from None


def _run_files(out: Path, methods: Sequence[str] = METHODS) -> list:
    """The files of a bsr-finetune run that ``out`` holds (relative paths); ``methods``: the
    per-method folders (``--multitask`` passes its own)."""
    names = ["args.json", "summary.json", "summary.csv", "report.png"]
    names += [f"{m}/{f}" for m in methods for f in ("checkpoint.pt", "result.json",
                                                      "delta.safetensors", "delta.json")]
    return [n for n in names if (out / n).is_file()]


def _args_record(args: argparse.Namespace) -> dict:
    from .. import __version__
    return {"argv": getattr(args, "argv", sys.argv[1:]),
            "earlier_argv": getattr(args, "earlier_argv", []),
            "bsr_kernels": __version__, "torch": torch.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("argv", "earlier_argv")}}


def _claim_out(args: argparse.Namespace, warn, methods: Sequence[str] = METHODS) -> RunLock:
    """Checks ``--out`` and takes it: a writable folder, locked, holding no other run (unless
    --resume/--overwrite; a run of ``methods``); removes orphaned temporary files and writes
    ``args.json``."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder; choose a folder (it is created "
                         "if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, "--out").acquire()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); choose a "
                         "writable folder") from e
    try:
        removed = clean_orphans(out)
        if removed:
            warn(f"removed {len(removed)} temporary file(s) left in {out} by an interrupted "
                 f"write: {', '.join(str(p.relative_to(out)) for p in removed[:4])}")
        found = _run_files(out, methods)
        # args.json alone (a run stopped before its first epoch ended) holds nothing to lose.
        if found and found != ["args.json"] and not args.resume and not args.overwrite:
            raise ValueError(f"--out {out} already holds a run ({', '.join(found[:4])}"
                             f"{', ...' if len(found) > 4 else ''}); pass --resume to continue "
                             "it, --overwrite to replace it, or choose another folder")
        # --overwrite deletes the earlier run later, once data and weights have loaded: a
        # mistake in the other arguments must not cost the old run.
        lock.replaced = [n for n in found if n != "args.json"] if args.overwrite else []
        write_json(out / "args.json", _args_record(args), format=ARGS_FORMAT, version=1)
    except OSError as e:
        lock.release()
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); choose a "
                         "writable folder") from e
    except BaseException:
        lock.release()
        raise
    return lock


def set_up_each(methods: Sequence[str], build) -> None:
    """Calls ``build(method)`` for each of ``methods`` (a set-up on a copy of the model, torch's
    RNG left as it was) before any trains: a setting refused there (``--train-blocks`` outside
    the model, a model BSR cannot reprogram) raises before the other methods have trained for
    nothing, and before ``--overwrite`` deletes the old run."""
    with torch.random.fork_rng(devices=[]):
        for method in methods:
            build(method)


def _delete_replaced(out: Path, lock: Optional[RunLock], warn) -> None:
    """--overwrite: deletes the earlier run's files (listed by :func:`_claim_out`) and the
    folders they leave empty (after :func:`set_up_each`, so that a refused setting keeps the
    old run)."""
    names = getattr(lock, "replaced", None)
    if not names:
        return
    for name in names:
        (out / name).unlink(missing_ok=True)
    for folder in {(out / name).parent for name in names} - {out}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    warn(f"--overwrite: deleted the earlier run in {out} ({len(names)} files)")
    lock.replaced = []


def _main_first(info: DistInfo, fn, others: bool = True):
    """``fn()`` on the main process, then, once it succeeded and when ``others``, on the
    other processes (which then find what it downloaded or wrote done); returns its result
    (None on processes that did not run it). An error of the main process's ``fn`` is raised
    on every process (on the others as a ValueError with its message) instead of leaving them
    waiting for the main one."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised here, its message sent to the others
            error = e
    if info.distributed:
        import torch.distributed as dist
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            raise ValueError(box[0])
    if error is not None:
        raise error
    if others and not info.is_main:
        result = fn()
    return result


def _prepare_out(args: argparse.Namespace, info: DistInfo, warn,
                 methods: Sequence[str] = METHODS) -> Optional[RunLock]:
    """:func:`_claim_out` on the main process; every process raises if it failed."""
    if args.out is None:
        return None
    return _main_first(info, lambda: _claim_out(args, warn, methods), others=False)


def _written(out: Path, methods: Sequence[str]) -> dict:
    """The run files in ``out`` other than args.json, with their sizes and times."""
    stats = {n: (out / n).stat() for n in _run_files(out, methods) if n != "args.json"}
    return {n: (s.st_size, s.st_mtime_ns) for n, s in stats.items()}


#: What a run stops on before it trains: a usage or input error (data, weights, checkpoints).
_SETUP_ERRORS = (ValueError, OSError, DatasetUnavailableError, WeightsUnavailableError)
#: What the ``main`` of either mode hands to :func:`exit_status` (a line and an exit status);
#: exit_status raises any other RuntimeError than an allocation failure again, traceback and all.
RUN_ERRORS = (*_SETUP_ERRORS, KeyboardInterrupt, MemoryError, RuntimeError)


@contextlib.contextmanager
def claimed_out(args: argparse.Namespace, info: DistInfo, warn,
                methods: Sequence[str] = METHODS):
    """``--out`` claimed (:func:`_prepare_out`) for the block, released after it.

    An error or an interrupt before the run has written any file (a usage or input error such
    as a missing data folder, a model that does not fit, a checkpoint of other options; or a
    defect) leaves the folder as it was: the earlier args.json back (so that the next bare
    --resume takes the run's own options again), or none, and no folder where there was none.
    One once the run has written a file keeps the new args.json, which describes those files
    and lets --resume continue them."""
    out = Path(args.out) if args.out is not None else None
    main = info.is_main and out is not None
    existed = main and out.is_dir()
    # the outermost folder that claiming --out creates (for --out a/b where there is no a: a)
    created = None if not main or out.exists() else next(
        d for d in (out, *out.parents) if d.parent.exists())
    previous = (out / "args.json").read_bytes() if existed and (out / "args.json").is_file() \
        else None
    lock = _prepare_out(args, info, warn, methods)
    written = _written(out, methods) if main else None
    restore = False
    try:
        yield lock
    except BaseException:
        restore = main and _written(out, methods) == written
        if restore:
            if previous is not None:
                atomic_write(out / "args.json", previous)
            else:
                (out / "args.json").unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            lock.release()
        folder = out if restore and created is not None else None
        while folder is not None and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent if folder != created else None


def run(args: argparse.Namespace, info: DistInfo, log=print, warn=None) -> dict:
    """Runs the parsed command: trains every method, measures, reports.

    Args:
        args: from :func:`build_parser`.
        info: this process.
        log: where progress lines go (main process).
        warn: where warnings go (main process; default: nowhere).

    Returns:
        The summary dict (``{"methods": {...}, ...}``), also on non-main processes.
    """
    t_start = time.perf_counter()
    warn = warn or (lambda s: None)
    taken = _resolve_resume(args, warn)
    if taken and info.is_main:
        log(f"--resume: as the run was started: {' '.join(taken)}")
    check_model_name(args.model)
    check_optimizer_name(args.opt)
    kind = data_kind(args.data)
    methods = args.method or (METHODS if kind == "digits" else ("bsr",))
    if args.epochs is None:
        args.epochs = DEMO_EPOCHS if kind == "digits" else OTHER_EPOCHS
    if args.activation_dtype is not None and args.memory_mode == "autograd":
        raise ValueError("--activation-dtype compresses what --memory-mode lean or fast saves; "
                         "--memory-mode autograd saves what autograd saves")
    check_weight_options(args)
    if args.torchcompile_mode is not None and not args.torchcompile:
        raise ValueError(f"--torchcompile-mode {args.torchcompile_mode} is torch.compile's "
                         "mode: add --torchcompile")
    # options on the command line (main() sets them; those --resume took from the earlier run
    # are not); called without main(), a block list counts when set at all
    given = set(args.given) if getattr(args, "given", None) is not None else {
        n for n in ("train_blocks", "drop_at") if getattr(args, n)}
    refuse_unused_options(given, [
        (("train_blocks", "drop_at", "keep_rate", "memory_mode", "activation_dtype"),
         "bsr" in methods, "--method bsr only"),
        (("data_root",), kind == "torchvision",
         f"--data {', '.join(TORCHVISION_SETS)} (their download folder)"),
        (("bad_images",), kind == "folder", "--data DIR (image folders)"),
        out_options_rule(args, ("overwrite", "save_every_steps"))])
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes ({info.world_size})")
    if "bsr" in methods:
        _check_amp(args.amp, info.device)
    # what --memory-mode stands for on this device (args.json keeps the option as given, so a
    # run resumed elsewhere resolves "auto" there)
    args.memory_mode_used = resolve_memory_mode(args.memory_mode, info.device,
                                                args.activation_dtype)
    # --out is checked (and locked) before any data or weights are loaded.
    check_resumed_methods(args, info, methods, METHODS, warn)
    with claimed_out(args, info, warn) as lock:
        return _run(args, info, log, warn, methods, t_start, lock)


def check_resumed_methods(args: argparse.Namespace, info: DistInfo, methods: Sequence[str],
                          all_methods: Sequence[str], warn) -> None:
    """``--resume`` in either mode (``all_methods``: the mode's): warns (main process) when the
    run in --out also holds methods that ``methods`` leaves out (the summary and report this run
    writes leave them out; their files stay), and refuses a finished method without its
    checkpoint (:func:`_check_finished_have_checkpoints`). Nothing without --resume."""
    if not args.resume:
        return
    out = Path(args.out)
    if info.is_main:
        left = [m for m in all_methods if m not in methods and (out / m).is_dir()]
        if left:
            warn(f"--method {','.join(methods)}: the run in {args.out} also holds "
                 f"{', '.join(left)}, which this run's summary and report leave out (their "
                 f"files stay; --method {','.join([*methods, *left])} keeps them in)")
    _check_finished_have_checkpoints(out, methods)


def _check_finished_have_checkpoints(out: Path, methods: Sequence[str]) -> None:
    """``--resume``: a method that finished earlier (its result.json or delta is in ``out``)
    but whose checkpoint.pt is gone (deleted to save space) can be neither reused nor continued;
    CheckpointError naming the file and the ways on, instead of training it again from the
    start."""
    for method in methods:
        folder = out / method
        found = [f for f in ("result.json", "delta.safetensors") if (folder / f).is_file()]
        if found and not (folder / "checkpoint.pt").is_file():
            raise CheckpointError(
                f"--resume: {method} finished in an earlier run ({' and '.join(found)} in "
                f"{folder}) but its checkpoint {folder / 'checkpoint.pt'} is missing, so it can "
                f"be neither reused nor continued. Put the checkpoint back, leave {method} out "
                f"of --method (its files stay), or delete {folder} to train {method} again "
                f"from the start")


def _run(args, info: DistInfo, log, warn, methods, t_start: float,
         lock: Optional[RunLock] = None) -> dict:
    data_config = model_data_config(args.model, args.img_size)
    img_size, mean, std = int(data_config["input_size"][-1]), data_config["mean"], \
        data_config["std"]
    shift = DIGITS_SHIFT * img_size // 8
    check_patch_fit(args.model, img_size)   # before the data, whose check reads every image

    def data_now():
        return build_data(args.data, img_size, mean, std, args.data_root, digits_shift=shift,
                          bad_images=args.bad_images, warn=warn, data_config=data_config)

    def model_now():
        return build_model(args.model, data.num_classes, img_size, args.pretrained,
                           args.checkpoint)

    # Under torchrun, downloads (a torchvision set, hub weights) happen on the main process
    # first: processes writing the same files at once can corrupt them.
    data = (_main_first(info, data_now) if data_kind(args.data) == "torchvision"
            else data_now())
    seed_all(args.seed)
    base, minfo = _main_first(info, model_now) if args.pretrained else model_now()
    if info.is_main:
        log(f"bsr-finetune: {args.model} ({minfo['weights']}), {img_size} px, "
            f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params; data {data.name}: "
            f"{len(data.train)} train / {len(data.test)} test images, {data.num_classes} "
            f"classes; {info.world_size} process(es) on {info.device}; methods "
            f"{', '.join(methods)}, {args.epochs} epochs")
        for note in minfo.get("notes", ()):
            warn(note)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    out = Path(args.out) if args.out is not None else None
    set_up_each(methods, lambda m: _adapt(base, m, args))
    if out is not None and info.is_main:
        _delete_replaced(out, lock, warn)
    histories: dict = {}

    def on_epoch(method: str, history: list) -> None:
        histories[method] = list(history)
        if out is not None:
            write_history_csv(out / "summary.csv", histories)

    models, results = {}, {}
    same = _resolved_blocks(len(base.blocks))
    for method in methods:
        lr = args.lr if args.lr is not None else (
            DEMO_LR if args.model == DIGITS_MODEL else DEFAULT_LR)[method]
        seed_all(args.seed)
        model = _adapt(base, method, args)
        model.to(info.device)
        fp = {**_fingerprint(args, method, data.num_classes, img_size, lr, info.device),
              **_data_identity(data)}
        ckpt = out / method / "checkpoint.pt" if out is not None else None
        done_file = out / method / "result.json" if out is not None else None
        if args.resume and done_file is not None and done_file.is_file() and ckpt.is_file():
            state = load_checkpoint(ckpt, fp, extendable=("epochs",), normalize=same,
                                    optional=DATA_IDENTITY)
            # finished earlier: reuse, do not retrain (a checkpoint saved inside a later epoch
            # holds other weights: fit refuses it)
            if int(state["epoch"]) == args.epochs and not state.get("partial_epoch"):
                res = read_json(done_file, f"the result of method {method}",
                                f"delete it and rerun with --resume: it is rebuilt from "
                                f"{ckpt} without training again",
                                format=RESULT_FORMAT, versions=(1,))
                res.pop("format"), res.pop("version")
                if "step_time_s" in res:   # an earlier version's name for the loop's median
                    res["median_step_time_s"] = res.pop("step_time_s")
                if method == "bsr":   # measured again below, in this run's mode
                    res["memory_mode"] = args.memory_mode_used
                model.load_state_dict(state["model"])
                if info.is_main:
                    log(f"{method}: finished in an earlier run, accuracy "
                        f"{100 * res['accuracy']:.2f}%")
                models[method], results[method] = model, res
                histories[method] = list(res.get("history", []))
                continue
        opts = FitOptions(epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                          head_lr_scale=args.head_lr_scale, weight_decay=args.weight_decay,
                          opt=args.opt, amp=args.amp, compile=args.torchcompile,
                          compile_mode=args.torchcompile_mode,
                          sched=args.sched,
                          warmup_epochs=args.warmup_epochs,
                          workers=args.workers, seed=args.seed, progress=progress,
                          log_interval=args.log_interval, checkpoint=ckpt,
                          save_every_steps=args.save_every_steps,
                          resume=args.resume,
                          on_epoch=lambda h, m=method: on_epoch(m, h))
        res = fit(model, data, opts, info, fingerprint=fp, log=log, name=method,
                  normalize=same, optional=DATA_IDENTITY)
        histories[method] = list(res["history"])
        trained = trainable_parameters(model)
        res.update({"lr": lr, "head_lr": lr * args.head_lr_scale, "epochs": args.epochs,
                    "trainable_params": sum(p.numel() for p in trained.values()),
                    "total_params": sum(p.numel() for p in model.parameters())})
        if method == "bsr":
            cfg = model.bsr_config
            res.update({"train_blocks": list(cfg.train_blocks),
                        "drop_at": list(cfg.drop_at), "keep_rate": cfg.keep_rate,
                        "memory_mode": args.memory_mode_used,
                        "activation_dtype": args.activation_dtype or "exact"})
        if info.is_main and out is not None:
            from ..delta import save_delta
            delta = save_delta(model, out / method / "delta.safetensors",
                               extra={"model": args.model, "data": data.name,
                                      "classes": _json_names(data.classes),
                                      "img_size": img_size,
                                      "accuracy": res["accuracy"]})
            res["delta_mib"] = delta.stat().st_size / 2**20
            write_json(done_file, res, format=RESULT_FORMAT, version=1)
        models[method], results[method] = model, res

    if info.is_main:
        log(f"measuring: saved activation memory and FLOPs ({args.profile_batch} images)"
            + (f", then step times ({args.timing_rounds} rounds side by side)"
               if args.timing_rounds else "") + "...")
        _measure(models, results, data, args, info, log)
    summary = {"methods": results, "model": args.model, "weights": minfo["weights"],
               "data": data.name, "num_classes": data.num_classes, "img_size": img_size,
               "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
               "device": str(info.device), "world_size": info.world_size,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "wall_time_s": time.perf_counter() - t_start}
    if info.is_main:
        log("")
        log(format_table(results))
        if out is not None:
            write_history_csv(out / "summary.csv", histories)
            path = write_summary(out / "summary.json", results,
                                 {k: v for k, v in summary.items() if k != "methods"})
            png = _draw(models, results, data, args, out / "report.png")
            log(f"\nwrote {path}, {out / 'summary.csv'}" + (f" and {png}" if png else ""))
        log(f"wall time {summary['wall_time_s']:.1f} s")
    return summary


def _adapt(base: nn.Module, method: str, args) -> nn.Module:
    """A copy of ``base`` set up for ``method`` with the command line's BSR settings; a refused
    setting is named by its flag (``--train-blocks``, not reprogram's ``train_blocks``)."""
    try:
        return adapt(copy.deepcopy(base), method,
                     train_blocks=args.train_blocks if method == "bsr" else None,
                     drop_at=args.drop_at if method == "bsr" else None,
                     keep_rate=args.keep_rate, memory_mode=args.memory_mode_used,
                     activation_dtype=_ACTIVATION_DTYPES[args.activation_dtype])
    except ValueError as e:
        message = str(e)
        for name in ("train_blocks", "drop_at", "keep_rate", "memory_mode", "activation_dtype"):
            if message.startswith(name):
                raise ValueError(f"--{name.replace('_', '-')}{message[len(name):]}") from e
        raise


def _measure(models: dict, results: dict, data, args, info: DistInfo, log) -> None:
    """Memory and FLOPs (bsr_kernels.profile) and side-by-side step times, main process only."""
    from ..profile import profile

    images, labels = _first_batch(data.test, args.profile_batch)
    images, labels = images.to(info.device), labels.to(info.device)
    for method, model in models.items():
        model.train()   # a training step (evaluation left the model in eval mode)
        prof = profile(model, images, labels)
        results[method].update({k: prof[k] for k in (
            "saved_activation_mib_per_image", "train_gflops_per_image",
            "forward_gmacs_per_image", "tokens_per_block")})
    if args.timing_rounds:
        per_rank = args.batch_size // info.world_size
        images, labels = _first_batch(data.train, per_rank)
        times = time_steps(models, images.to(info.device), labels.to(info.device),
                           rounds=args.timing_rounds, amp=args.amp)
        for method, t in times.items():
            results[method]["step_time_s"] = t
            results[method]["timing_batch_size"] = images.shape[0]
        if "full" in times:
            for method, t in times.items():
                results[method]["step_time_vs_full"] = t / times["full"]


def _draw(models: dict, results: dict, data, args, path: Path) -> Optional[Path]:
    """The PNG report; the kept-token pictures need a BSR model that drops tokens."""
    from ..reprogram import kept_patches

    images = kept = None
    drop_at: Sequence[int] = ()
    model = models.get("bsr")
    if model is not None and args.samples and model.bsr_config.drop_at:
        x, _ = _first_batch(data.test, args.samples)
        model.eval()
        kept = kept_patches(model, x.to(next(model.parameters()).device))
        images = _unnormalise(x, data.mean, data.std)
        drop_at = model.bsr_config.drop_at
    patch = model.patch_embed.patch_size[0] if model is not None else 1
    try:
        return draw_report(path, results, images, kept, patch, drop_at,
                           title=f"{args.model} on {data.name}")
    except ImportError as e:   # matplotlib missing: the JSON still holds everything
        print(f"bsr-finetune: no PNG report ({e})", file=sys.stderr)
        return None


def _is_multitask_flag(parser: argparse.ArgumentParser, arg: str) -> bool:
    """Whether ``parser`` (:func:`build_parser`) reads ``arg`` as --multitask: the flag itself
    or, as argparse takes any unambiguous prefix of a long option, an abbreviation that no
    other option starts with (``--multi``), which would otherwise start the single-task run."""
    if len(arg) < 3 or not "--multitask".startswith(arg):
        return False
    return [o for o in parser._option_string_actions if o.startswith(arg)] == ["--multitask"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``bsr-finetune``; returns the exit status: 0, 2 on a usage or input
    error, 3 (:data:`EXIT_DIVERGED`) when the training loss became NaN or infinite."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    multitask = [a for a in argv if _is_multitask_flag(parser, a)]
    if multitask:   # bsr_kernels.finetune.multitask parses its own options
        from .multitask import main as multitask_main
        return multitask_main([a for a in argv if a not in multitask])
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv)   # --resume takes the rest from the earlier run
    args.argv = argv
    info = None
    try:
        info = setup_distributed(args.device)
        log = print if info.is_main else (lambda *a, **k: None)

        def warn(s: str) -> None:
            if info.is_main:
                print(f"bsr-finetune: warning: {s}", file=sys.stderr, flush=True)

        run(args, info, log=lambda s: log(s, flush=True), warn=warn)
    except RUN_ERRORS as e:
        return exit_status("bsr-finetune", e, args.out)
    finally:
        teardown_distributed()
    return 0


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError, or Python's MemoryError."""
    return (isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def exit_status(prog: str, e: BaseException, out) -> int:
    """Reports ``e``, raised by a run (called in its ``except``), on stderr and returns the exit
    status, for both modes of bsr-finetune: 2 for a usage, input or I/O error (``out``: the run's
    folder, None without --out), 3 (:data:`EXIT_DIVERGED`) for a NaN/inf training loss, 128 + the
    signal for a stop at a step boundary, 130 for another Ctrl-C. ``BSR_FINETUNE_DEBUG`` set:
    errors are raised again, with their traceback, as is a RuntimeError that is neither an
    allocation failure nor a data or weights error (a bug)."""
    if isinstance(e, RuntimeError) and not isinstance(e, _SETUP_ERRORS) \
            and not out_of_memory(e):
        raise e
    if isinstance(e, TrainingInterrupted):
        where = f"; {e.saved} holds the training up to that step" if e.saved else ""
        print(f"{prog}: stopped by signal {e.signal} at a step boundary{where}; rerun with "
              "--resume to continue", file=sys.stderr)
        return 128 + int(e.signal)
    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted; " + ("rerun with --resume to continue (the checkpoints in "
                                          "--out hold every finished epoch)" if out is not None
                                          else "nothing was saved (no --out)"), file=sys.stderr)
        return 130
    if os.environ.get("BSR_FINETUNE_DEBUG"):   # the full traceback, for developers
        raise e
    if out_of_memory(e):
        what = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: out of memory ({what}); lower --batch-size or --img-size",
              file=sys.stderr)
        return 2
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        # a file or folder that cannot be read or written, named
        print(f"{prog}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2
    kind = ("checkpoint error" if isinstance(e, CheckpointError) else
            "training diverged" if isinstance(e, TrainingDivergedError) else "error")
    print(f"{prog}: {kind}: {e}", file=sys.stderr)
    return EXIT_DIVERGED if isinstance(e, TrainingDivergedError) else 2
