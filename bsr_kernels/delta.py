"""Delta checkpoints: only the parameters a fine-tuning trained, for one task.

A delta is one safetensors file holding the trained tensors (for BSR on a 12-block ViT: blocks
3, 7, 11 and the head, about a quarter of the model) with a small JSON config in its metadata:
the BSR settings, which parameters it holds with their dtypes, a SHA-256 checksum of the tensors,
and a fingerprint (and the dtypes) of the frozen base weights it was trained on. A JSON copy is
written next to it (``<stem>.json``) for people to read; loading never reads it. A device keeps
the base model once and one delta per task::

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    bsr_kernels.load_delta(model, "cifar10.safetensors")     # now the CIFAR-10 BSR model

Loading brings the model to exactly the state the delta was saved from: the trained tensors,
the head size, and the BSR settings. A plain base model is reprogrammed with the delta's
settings; a model reprogrammed with *other* settings is reprogrammed with the delta's (with a
warning naming what changed); a model reprogrammed when the delta was saved from a plain model
is restored (with a warning). Everything is checked before the model is touched, so a refused
delta leaves the model unchanged. Damaged or edited files are refused: the metadata is checked
against a schema, the tensors against the checksum, and their dtypes against the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from .checkpoint import atomic_write, to_strict_json, write_json

__all__ = ["DELTA_FORMAT", "DELTA_VERSION", "save_delta", "load_delta", "read_delta",
           "base_fingerprint", "tensor_checksum"]

DELTA_FORMAT = "bsr-delta"
#: Version 2 added ``dtypes`` and ``checksum``; version 1 files (without them) still load.
#: ``base_dtypes`` (the frozen weights' dtypes) is optional in version 2: older files lack it.
DELTA_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_META_KEY = "bsr_kernels"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BSR_KEYS = ("train_blocks", "drop_at", "keep_rate", "fuse_token", "memory_mode", "train_norm",
             "activation_dtype")
#: Facts of the model a BSR config also records (``BSRConfig.to_dict()``); checked, not set.
_BSR_MODEL_KEYS = ("depth", "num_prefix_tokens")
#: The classifier heads ``reset_classifier`` replaces (``head_dist``: timm's distilled DeiT).
_HEADS = ("head", "head_dist")


def _digest(items) -> str:
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_checksum(tensors: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``{name: tensor}`` (sorted by name)."""
    return _digest(sorted(tensors.items()))


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the parameters not in ``exclude``.

    Two models share a fingerprint exactly when their frozen (base) weights are equal.
    """
    excluded = set(exclude)
    return _digest((n, p) for n, p in sorted(model.named_parameters()) if n not in excluded)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bsr_config(model: nn.Module) -> Optional[dict]:
    """The model's BSR config as JSON values (``BSRConfig.to_dict()``), or None."""
    cfg = getattr(model, "bsr_config", None)
    return None if cfg is None else cfg.to_dict()


def save_delta(model: nn.Module, path: os.PathLike, names: Optional[Iterable[str]] = None,
               extra: Optional[dict] = None) -> Path:
    """Writes the trained parameters of ``model`` as a delta checkpoint, atomically.

    Args:
        model: the fine-tuned model (reprogrammed or not; ``torch.compile``'s or DDP's wrapper
            is looked through, so the names are the model's own).
        path: the ``.safetensors`` file to write; ``<stem>.json`` (a readable copy of the
            config) is written next to it, so ``path`` must not end in ``.json``.
        names: parameter names to store; default those with ``requires_grad``.
        extra: more JSON-serialisable information for the config (task, classes, accuracy...).

    Returns:
        The path of the safetensors file.

    Raises:
        ValueError: if ``path`` ends in ``.json``, there is nothing to store, ``names`` is a
            string or repeats a name, a name is not a parameter of ``model``, a parameter holds
            NaN or infinity, ``extra`` is not a JSON-serialisable dict, or the config would not
            pass :func:`read_delta`'s checks. Nothing is written then (an existing file at
            ``path`` is kept).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.with_suffix(".json") == path:
        raise ValueError(f"path {path}: a delta's readable JSON copy is written to "
                         f"<stem>.json, which would overwrite the delta itself; name the delta "
                         f"{path.with_suffix('.safetensors').name} instead")
    if isinstance(names, str):
        raise ValueError(f"names must be a list of parameter names, got the string {names!r}; "
                         f"write names=[{names!r}]")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict of JSON values (or None), got "
                         f"{type(extra).__name__} {extra!r}"[:200])
    model = unwrap_model(model)   # torch.compile's or DDP's wrapper: the model's own names
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names repeats {repeated[:5]}; give each parameter once")
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names holds non-parameters of the model: {unknown[:5]}")
    if not names:
        raise ValueError("model has no trained parameters (requires_grad) to store in a delta")
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the model's parameters {bad[:5]} hold NaN or infinity (did training "
                         "diverge?); refusing to save them as a delta")
    head = getattr(model, "head", None)
    config = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "parameters": names,
        "dtypes": {n: _dtype_name(t.dtype) for n, t in tensors.items()},
        "checksum": tensor_checksum(tensors),
        "numel": sum(t.numel() for t in tensors.values()),
        "model_numel": sum(p.numel() for p in params.values()),
        "num_classes": getattr(head, "out_features", None),
        **_pool_entry(model),
        "bsr": _bsr_config(model),
        **_moe_entry(model),
        "base_fingerprint": base_fingerprint(model, exclude=names),
        "base_dtypes": _frozen_dtypes(model, names),
        "extra": extra or {},
    }
    config = to_strict_json(config)
    try:
        meta = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must hold JSON values only (str, numbers, bools, None, lists, "
                         f"dicts): {e}") from e
    errs = _schema_errors(config)   # what read_delta checks: never write a file it refuses
    if errs:
        raise ValueError("save_delta would write a delta that read_delta refuses: "
                         + "; ".join(errs[:6]))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: meta}))
    write_json(path.with_suffix(".json"), config)
    return path


def _pool_entry(model: nn.Module) -> dict:
    """``{"global_pool": ...}`` of a timm ViT: no parameter tells ``"token"`` from ``"avg"``
    without ``fc_norm``, yet the logits differ; else nothing (files written before it was
    recorded lack it too)."""
    pool = getattr(model, "global_pool", None)
    return {"global_pool": pool} if isinstance(pool, str) else {}


def _moe_entry(model: nn.Module) -> dict:
    """``{"moe": routing settings}`` of a model with MoE blocks (:func:`moe.routing_settings`:
    no parameter holds them), else nothing (a delta of a model without one has no such key)."""
    from .moe import routing_settings
    settings = routing_settings(model)
    return {"moe": settings} if settings else {}


def _frozen_dtypes(model: nn.Module, exclude: Iterable[str]) -> list:
    """The distinct dtype names of the parameters not in ``exclude`` (the frozen base)."""
    excluded = set(exclude)
    return sorted({_dtype_name(p.dtype) for n, p in model.named_parameters()
                   if n not in excluded})


def _schema_errors(config) -> list:
    """What is wrong with a delta's config (empty when it is well formed)."""
    if not isinstance(config, dict):
        return [f"the config is a JSON {type(config).__name__}, not an object"]
    errs = []

    def need(key, ok, what):
        if key not in config:
            errs.append(f"{key} is missing")
        elif not ok(config[key]):
            errs.append(f"{key} must be {what}, got {config[key]!r}"[:200])

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need("parameters", lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v)
         and len(set(v)) == len(v), "a non-empty list of distinct parameter names")
    need("numel", lambda v: is_int(v) and v >= 0, "an integer")
    need("model_numel", lambda v: is_int(v) and v >= 0, "an integer")
    need("num_classes", lambda v: v is None or (is_int(v) and v >= 1), "null or a positive int")
    need("base_fingerprint", lambda v: isinstance(v, str) and bool(_HEX64.match(v)),
         "a SHA-256 hex digest (64 hex digits)")
    need("extra", lambda v: isinstance(v, dict), "an object")
    if config.get("version") == 2:
        need("checksum", lambda v: isinstance(v, str) and bool(_HEX64.match(v)),
             "a SHA-256 hex digest (64 hex digits)")
        need("dtypes", lambda v: isinstance(v, dict) and all(
            isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype)
            for d in v.values()), "an object of dtype names")
    if "base_dtypes" in config:     # optional: files written before it was recorded lack it
        need("base_dtypes", lambda v: isinstance(v, list) and all(
            isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype)
            for d in v), "a list of dtype names")
    if "global_pool" in config:     # optional: files written before it was recorded lack it
        need("global_pool", lambda v: isinstance(v, str), "a pool name")
    if "moe" in config:     # optional: only a model with MoE blocks has one
        from .moe import ROUTING_SETTINGS

        def routing(v):
            num = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
                   and math.isfinite(x) and x >= 0)
            return (isinstance(v, dict) and set(v) == set(ROUTING_SETTINGS)
                    and is_int(v["top_k"]) and v["top_k"] >= 1
                    and isinstance(v["renormalize"], bool) and num(v["noise_std"])
                    and num(v["aux_loss_weight"]))
        need("moe", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and routing(r) for k, r in v.items()),
            "an object of MoE modules' routing settings")
    need("bsr", lambda v: v is None or isinstance(v, dict), "null or an object")
    bsr = config.get("bsr")
    if isinstance(bsr, dict):
        def blocks(v):
            return isinstance(v, list) and all(is_int(i) and i >= 0 for i in v) \
                and len(set(v)) == len(v)
        checks = {
            "train_blocks": (blocks, "a list of distinct block indices"),
            "drop_at": (blocks, "a list of distinct block indices"),
            "keep_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"),
            "fuse_token": (lambda v: isinstance(v, bool), "true or false"),
            "memory_mode": (lambda v: isinstance(v, str), "a memory mode name"),
            "train_norm": (lambda v: isinstance(v, bool), "true or false"),
            "activation_dtype": (lambda v: v is None or (isinstance(v, str) and isinstance(
                getattr(torch, v, None), torch.dtype)), "null or a dtype name"),
            "depth": (lambda v: is_int(v) and v >= 1, "a positive int"),
            "num_prefix_tokens": (lambda v: is_int(v) and v >= 1, "a positive int"),
        }
        for key, (ok, what) in checks.items():
            if key not in bsr:
                if key in ("train_blocks", "drop_at", "keep_rate", "fuse_token"):
                    errs.append(f"bsr.{key} is missing")
            elif not ok(bsr[key]):
                errs.append(f"bsr.{key} must be {what}, got {bsr[key]!r}"[:200])
        unknown = sorted(set(bsr) - set(_BSR_KEYS) - set(_BSR_MODEL_KEYS))
        if unknown:
            errs.append(f"bsr holds unknown settings {unknown}")
    return errs


def read_delta(path: os.PathLike) -> tuple[dict, dict]:
    """Reads and validates a delta checkpoint.

    Returns:
        (tensors, config): ``{name: tensor}`` on CPU and the JSON config.

    Raises:
        ValueError: if the file is missing, unreadable, not a delta checkpoint, of another
            version, or damaged: metadata that breaks the schema, tensors that differ from the
            listed parameters, dtypes or checksum (each problem is named).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {path}: no such delta checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
        raise ValueError(f"path {path}: cannot read it as safetensors ({e})") from e
    if _META_KEY not in meta:
        raise ValueError(f"path {path}: a safetensors file but not a bsr_kernels delta "
                         "(no config in its metadata)")
    try:
        config = json.loads(meta[_META_KEY], parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError(f"path {path}: a damaged bsr_kernels delta (its metadata is not valid "
                         f"JSON: {e}); save the delta again") from e
    if not isinstance(config, dict):
        raise ValueError(f"path {path}: a damaged bsr_kernels delta (its config is a JSON "
                         f"{type(config).__name__}, not an object); save the delta again")
    if config.get("format") != DELTA_FORMAT or config.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"path {path}: delta format {config.get('format')!r} version "
                         f"{config.get('version')!r}, expected {DELTA_FORMAT!r} version "
                         f"{' or '.join(map(str, _READABLE_VERSIONS))}")
    errs = _schema_errors(config)
    if not errs and set(tensors) != set(config["parameters"]):
        errs.append(f"its tensors {sorted(set(tensors) ^ set(config['parameters']))[:5]} "
                    "differ from the parameters its config lists")
    if not errs and config["version"] >= 2:
        wrong = [f"{n} is {str(t.dtype).replace('torch.', '')}, saved as "
                 f"{config['dtypes'].get(n)}" for n, t in tensors.items()
                 if str(t.dtype).replace("torch.", "") != config["dtypes"].get(n)]
        if wrong:
            errs.append("tensor dtypes were changed: " + "; ".join(wrong[:5]))
        elif tensor_checksum(tensors) != config["checksum"]:
            errs.append("the tensors do not match the checksum stored when it was saved "
                        "(changed or corrupted bytes)")
    if errs:
        raise ValueError(f"path {path}: a damaged or edited bsr_kernels delta: "
                         + "; ".join(errs[:6]) + "; save the delta again from the fine-tuned "
                         "model")
    return tensors, config


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _model_bsr_state(config: dict) -> Optional[dict]:
    """The delta's BSR settings with the defaults of older files filled in, or None."""
    bsr = config.get("bsr")
    if bsr is None:
        return None
    out = {"memory_mode": "lean", "train_norm": False, "activation_dtype": None}
    out.update({k: v for k, v in bsr.items() if k in _BSR_KEYS})
    return out


def _base_difference(model: nn.Module, tensors: dict, config: dict) -> str:
    """Why a base's fingerprint may differ: another dtype if the delta tells, else other weights.

    The base's dtypes are recorded in ``base_dtypes``; files without it tell the dtypes of the
    trained parameters (``dtypes``, version 2), which a cast model changes alike.
    """
    saved = config.get("base_dtypes")
    if saved is not None:
        have = _frozen_dtypes(model, tensors)
    else:
        params = dict(model.named_parameters())
        saved = sorted(set((config.get("dtypes") or {}).values()))
        have = sorted({_dtype_name(params[n].dtype) for n in tensors if n in params})
    if saved and have and saved != have:
        return (f"the model's weights are {', '.join(have)}, the delta was saved from "
                f"{', '.join(saved)} ones: load the delta into the {', '.join(saved)} model, "
                "then cast it")
    return "other pre-trained weights?"


def load_delta(model: nn.Module, path: os.PathLike, check_base: bool = True) -> nn.Module:
    """Brings ``model`` to exactly the state a delta checkpoint was saved from, in place.

    * The trained tensors are copied in.
    * A head of another size, or none (a backbone created with ``num_classes=0``), is first
      replaced (``model.reset_classifier``) by one of the delta's number of classes (both heads
      of a distilled DeiT: ``head`` and ``head_dist``).
    * BSR settings: a BSR delta reprograms a plain model with its settings, and *re*-programs
      a model reprogrammed with other settings (``keep_rate``, ``drop_at``...: they change the
      logits), warning with the settings replaced. A delta saved from a plain model restores a
      reprogrammed model (:func:`bsr_kernels.restore`), with a warning.

    Args:
        model: the base timm model (or the same model already reprogrammed; either may be
            wrapped by ``torch.compile`` or DDP).
        path: the delta's ``.safetensors`` file.
        check_base: refuse a base whose frozen weights differ from those the delta was
            trained on.

    Returns:
        The same model, holding the fine-tuned weights and settings.

    Raises:
        ValueError: if the file is not a valid delta (see :func:`read_delta`), its parameters
            (names, shapes, dtypes), depth, prefix tokens, ``global_pool`` or MoE routing do
            not fit ``model``, the model cannot take the delta's BSR
            settings, or (with ``check_base``) the base weights differ. The model is then left
            unchanged.
    """
    tensors, config = read_delta(path)
    given, model = model, unwrap_model(model)   # a compiled or DDP-wrapped model: its own
    # Check everything first, so that a delta that does not fit leaves the model unchanged.
    params = dict(model.named_parameters())
    n_cls = config.get("num_classes")
    head = getattr(model, "head", None)
    # A head of another size, or none (timm's num_classes=0: an nn.Identity, the usual
    # backbone), is replaced by reset_classifier; timm's distilled DeiT resizes head_dist too.
    new_head = (n_cls is not None and hasattr(model, "reset_classifier")
                and (isinstance(head, nn.Linear) and head.out_features != n_cls
                     or isinstance(head, nn.Identity)))
    heads = {h: getattr(model, h) for h in _HEADS
             if isinstance(getattr(model, h, None), (nn.Linear, nn.Identity))}
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    replaced = {f"{h}.{kind}": (n_cls, getattr(m, "in_features", width)) if kind == "weight"
                else (n_cls,) for h, m in heads.items() for kind in ("weight", "bias")} \
        if new_head else {}
    missing = [n for n in tensors if n not in params and n not in replaced]
    problems = []
    for n, t in tensors.items():
        if n not in params and n not in replaced:
            continue
        want = replaced[n] if n in replaced else params[n].shape
        if tuple(want) != tuple(t.shape):
            problems.append(f"{n}: delta {tuple(t.shape)} vs model {tuple(want)}")
        elif n in params and t.is_floating_point() != params[n].is_floating_point():
            problems.append(f"{n}: delta dtype {t.dtype} vs model {params[n].dtype}")
    bsr = config.get("bsr") or {}
    depth = len(getattr(model, "blocks", ()))
    if bsr.get("depth", depth) != depth:
        problems.append(f"the delta is for a {bsr['depth']}-block model, this one has {depth}")
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is not None and bsr.get("num_prefix_tokens", prefix) != prefix:
        problems.append(f"the delta is for a model with {bsr['num_prefix_tokens']} prefix "
                        f"tokens, this one has {prefix}")
    pool = _pool_entry(model).get("global_pool")
    if "global_pool" in config and pool is not None and config["global_pool"] != pool:
        problems.append(f"the delta is for a model with global_pool={config['global_pool']!r}, "
                        f"this one has {pool!r}")
    if isinstance(config.get("moe"), dict):  # MoE routing: no parameter holds it
        from .moe import routing_problems
        problems += routing_problems(model, config["moe"], "the delta")
    if missing or problems:
        raise ValueError(f"path {path}: the delta does not fit this model: "
                         + "; ".join([f"not in the model: {missing[:5]}"] * bool(missing)
                                     + problems[:5]))
    if check_base:
        fp = base_fingerprint(model, exclude=tensors)
        if fp != config["base_fingerprint"]:
            raise ValueError(f"path {path}: the model's frozen weights differ from the base the "
                             f"delta was trained on ({_base_difference(model, tensors, config)});"
                             " pass check_base=False to apply it anyway")
    want_bsr = _model_bsr_state(config)
    have = _bsr_config(model)
    have_bsr = None if have is None else {k: have.get(k) for k in _BSR_KEYS}
    if want_bsr is not None and want_bsr != have_bsr:
        from .reprogram import reprogram
        dtype = want_bsr["activation_dtype"]
        reprogram(model, train_blocks=want_bsr["train_blocks"], drop_at=want_bsr["drop_at"],
                  keep_rate=want_bsr["keep_rate"], fuse_token=want_bsr["fuse_token"],
                  memory_mode=want_bsr["memory_mode"], train_norm=want_bsr["train_norm"],
                  activation_dtype=getattr(torch, dtype) if dtype else None)
        if have_bsr is not None:   # warned once reprogram has taken them (it may refuse)
            changed = {k: (have_bsr.get(k), want_bsr.get(k)) for k in _BSR_KEYS
                       if have_bsr.get(k) != want_bsr.get(k)}
            warnings.warn(f"load_delta({path}): the model was reprogrammed with other BSR "
                          "settings; it is reprogrammed with the delta's: " + ", ".join(
                              f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                          stacklevel=2)
    elif want_bsr is None and have_bsr is not None:
        from .reprogram import restore
        warnings.warn(f"load_delta({path}): the delta was saved from a model that was not "
                      "reprogrammed; the model's BSR reprogramming is undone (restore)",
                      stacklevel=2)
        restore(model)
    if new_head:
        # a resized head keeps its requires_grad; a new one (none before) requires grad, as
        # reset_classifier makes it
        requires = {h: m.weight.requires_grad for h, m in heads.items()
                    if isinstance(m, nn.Linear)}
        model.reset_classifier(n_cls)
        for h, r in requires.items():
            for p in getattr(model, h).parameters():
                p.requires_grad_(r)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    from .moe import ROUTING_FORWARD
    modules = dict(model.named_modules())
    for name, settings in (config.get("moe") or {}).items():  # the training-only ones too
        for k, v in settings.items():   # (numbers, held as floats as MoEMlp's __init__ does)
            setattr(modules[name], k, v if k in ROUTING_FORWARD else float(v))
    return given
