"""Delta checkpoints: only the parameters a fine-tuning trained, for one task.

A delta is one safetensors file holding the trained tensors (for BSR on a 12-block ViT: blocks
3, 7, 11 and the head, about a quarter of the model) with a small JSON config in its metadata:
the BSR settings, which parameters it holds, and a fingerprint of the frozen base weights it was
trained on. A JSON copy of the config is written next to it for people to read. A device keeps
the base model once and one delta per task::

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    bsr_kernels.load_delta(model, "cifar10.safetensors")     # now the CIFAR-10 BSR model
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["DELTA_FORMAT", "save_delta", "load_delta", "read_delta", "base_fingerprint"]

DELTA_FORMAT = "bsr-delta"
DELTA_VERSION = 1
_META_KEY = "bsr_kernels"


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the parameters not in ``exclude``.

    Two models share a fingerprint exactly when their frozen (base) weights are equal.
    """
    excluded = set(exclude)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name in excluded:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _bsr_config(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "bsr_config", None)
    return None if cfg is None else cfg.to_dict()


def save_delta(model: nn.Module, path: os.PathLike, names: Optional[Iterable[str]] = None,
               extra: Optional[dict] = None) -> Path:
    """Writes the trained parameters of ``model`` as a delta checkpoint.

    Args:
        model: the fine-tuned model (reprogrammed or not).
        path: the ``.safetensors`` file to write; ``<stem>.json`` is written next to it.
        names: parameter names to store; default those with ``requires_grad``.
        extra: more JSON-serialisable information for the config (task, classes, accuracy...).

    Returns:
        The path of the safetensors file.

    Raises:
        ValueError: if there is nothing to store or a name is not a parameter of ``model``.
    """
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names holds non-parameters of the model: {unknown[:5]}")
    if not names:
        raise ValueError("model has no trained parameters (requires_grad) to store in a delta")
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    head = getattr(model, "head", None)
    config = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "parameters": names,
        "numel": sum(t.numel() for t in tensors.values()),
        "model_numel": sum(p.numel() for p in params.values()),
        "num_classes": getattr(head, "out_features", None),
        "bsr": _bsr_config(model),
        "base_fingerprint": base_fingerprint(model, exclude=names),
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(config)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_delta(path: os.PathLike) -> tuple[dict, dict]:
    """Reads a delta checkpoint.

    Returns:
        (tensors, config): ``{name: tensor}`` on CPU and the JSON config.

    Raises:
        ValueError: if the file is missing, unreadable or not a delta checkpoint.
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
    try:
        config = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"path {path}: a safetensors file but not a bsr_kernels delta "
                         "(no config in its metadata)") from e
    if config.get("format") != DELTA_FORMAT or config.get("version") != DELTA_VERSION:
        raise ValueError(f"path {path}: delta format {config.get('format')!r} version "
                         f"{config.get('version')!r}, expected {DELTA_FORMAT!r} {DELTA_VERSION}")
    return tensors, config


def load_delta(model: nn.Module, path: os.PathLike, check_base: bool = True) -> nn.Module:
    """Applies a delta checkpoint to the base model it was trained from, in place.

    A BSR delta also reprograms a plain model with the stored settings (token dropping is part
    of the fine-tuned model). A head of another size is first replaced
    (``model.reset_classifier``) by one of the delta's number of classes.

    Args:
        model: the base timm model (or the same model already reprogrammed).
        path: the delta's ``.safetensors`` file.
        check_base: refuse a base whose frozen weights differ from those the delta was
            trained on.

    Returns:
        The same model, holding the fine-tuned weights.

    Raises:
        ValueError: if the file is not a delta, its parameters do not fit ``model``, or (with
            ``check_base``) the base weights differ.
    """
    tensors, config = read_delta(path)
    # Check everything first, so that a delta that does not fit leaves the model unchanged.
    params = dict(model.named_parameters())
    n_cls = config.get("num_classes")
    head = getattr(model, "head", None)
    new_head = (n_cls is not None and isinstance(head, nn.Linear) and head.out_features != n_cls
                and hasattr(model, "reset_classifier"))
    missing = [n for n in tensors if n not in params]
    shapes = []
    for n, t in tensors.items():
        if n not in params:
            continue
        want = params[n].shape
        if new_head and n in ("head.weight", "head.bias"):
            want = (n_cls, head.in_features) if n == "head.weight" else (n_cls,)
        if tuple(want) != tuple(t.shape):
            shapes.append(f"{n}: delta {tuple(t.shape)} vs model {tuple(want)}")
    if missing or shapes:
        raise ValueError(f"path {path}: the delta does not fit this model: "
                         + "; ".join([f"not in the model: {missing[:5]}"] * bool(missing)
                                     + shapes[:5]))
    if check_base and config.get("base_fingerprint"):
        fp = base_fingerprint(model, exclude=tensors)
        if fp != config["base_fingerprint"]:
            raise ValueError(f"path {path}: the model's frozen weights differ from the base the "
                             "delta was trained on (other pre-trained weights?); pass "
                             "check_base=False to apply it anyway")
    bsr = config.get("bsr")
    if bsr is not None and getattr(model, "bsr_config", None) is None:
        from .reprogram import reprogram
        dtype = bsr.get("activation_dtype")
        reprogram(model, train_blocks=bsr["train_blocks"], drop_at=bsr["drop_at"],
                  keep_rate=bsr["keep_rate"], fuse_token=bsr["fuse_token"],
                  memory_mode=bsr.get("memory_mode", "lean"),
                  train_norm=bsr.get("train_norm", False),
                  activation_dtype=getattr(torch, dtype) if dtype else None)
    if new_head:
        requires = head.weight.requires_grad
        model.reset_classifier(n_cls)
        for p in model.head.parameters():
            p.requires_grad_(requires)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    return model
