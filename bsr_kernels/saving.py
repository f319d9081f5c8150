"""The BSR config travels with every saved form of a reprogrammed model.

Token dropping is part of a fine-tuned BSR model: its weights alone give other logits in a plain
timm model. So a reprogrammed model carries its settings (:func:`bsr_kernels.reprogram`'s
arguments, as a JSON dict) wherever it is saved:

* **state_dict**: in its metadata (``state_dict._metadata[prefix]["bsr_config"]``), which
  ``torch.save`` keeps. Full checkpoints (``torch.save(model.state_dict())``, timm's
  ``train.py`` checkpoints, ``save_for_hf``'s ``pytorch_model.bin``) hold it.
* **timm's** ``save_for_hf``: in ``config.json``, as a line of ``pretrained_cfg["notes"]`` (a
  reprogrammed model's ``pretrained_cfg`` holds it; timm's ``PretrainedCfg`` takes no new keys),
  so models made by ``create_model("local-dir:...")`` / ``"hf-hub:..."`` know it too
  (:func:`saved_bsr_config` of the model).
* **safetensors** full checkpoints written by :func:`save_checkpoint`: in the file's metadata.
* **delta** checkpoints (:func:`bsr_kernels.save_delta`): in their config.

Loading: :func:`load_checkpoint` reads any of these and re-applies ``reprogram`` to a plain
model (or to one reprogrammed differently). A reprogrammed model that is given a state_dict
saved under other BSR settings through ``load_state_dict`` warns. A plain model loaded by
torch or timm alone cannot know, as no bsr_kernels code runs there: load through
:func:`load_checkpoint`, or call :func:`saved_bsr_config` on what you loaded.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .checkpoint import atomic_write
from .config_access import bsr_config_dict, reprogram_from_dict

__all__ = ["save_checkpoint", "load_checkpoint", "saved_bsr_config", "BSRConfigWarning",
           "attach", "detach"]

KEY = "bsr_config"
#: How the config is written into timm's ``pretrained_cfg["notes"]`` (``PretrainedCfg`` takes no
#: other keys, so a new one would break ``create_model("local-dir:...")``).
NOTE_PREFIX = "bsr_kernels.reprogram config: "


class BSRConfigWarning(UserWarning):
    """Weights saved under other BSR settings than the model's (or none) were loaded."""


# --- attached to a reprogrammed model (reprogram / restore) --------------------------------------

def _state_dict_hook(module, state_dict, prefix, local_metadata):
    cfg = bsr_config_dict(module)
    if cfg is not None:
        local_metadata[KEY] = json.dumps(cfg, sort_keys=True)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                   errors):
    saved = local_metadata.get(KEY)
    mine = bsr_config_dict(module)
    if saved is None or mine is None:
        return
    saved = json.loads(saved)
    if saved != mine:
        warnings.warn(
            f"these weights were saved from a model reprogrammed with {saved}, but this model is "
            f"reprogrammed with {mine}; its logits will differ. Use "
            "bsr_kernels.load_checkpoint(model, path) to re-apply the saved settings.",
            BSRConfigWarning, stacklevel=3)


def attach(model: nn.Module) -> None:
    """Makes ``model``'s state_dict and ``pretrained_cfg`` carry its BSR config (on reprogram)."""
    detach(model)
    model.register_state_dict_post_hook(_state_dict_hook)
    model.register_load_state_dict_pre_hook(_load_pre_hook)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        note = NOTE_PREFIX + json.dumps(bsr_config_dict(model), sort_keys=True)
        # a copy: timm shares it
        _set_pretrained_cfg(model, {**cfg, "notes": _user_notes(cfg) + (note,)})


def detach(model: nn.Module) -> None:
    """Undoes :func:`attach` (on restore)."""
    for hooks in (model._state_dict_hooks, model._load_state_dict_pre_hooks):
        for key in [k for k, h in hooks.items()
                    if getattr(h, "hook", h) in (_state_dict_hook, _load_pre_hook)]:
            del hooks[key]
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and _from_notes(cfg) is not None:
        # without notes of its own, the cfg had no "notes" key before attach added one (timm's
        # pretrained_cfg dicts hold no "notes": None): the key goes, rather than become None
        notes = _user_notes(cfg)
        _set_pretrained_cfg(model, {**cfg, "notes": notes} if notes else
                            {k: v for k, v in cfg.items() if k != "notes"})


def _user_notes(cfg: dict) -> tuple:
    """The notes of a ``pretrained_cfg`` dict, less the line :func:`attach` adds."""
    return tuple(n for n in (cfg.get("notes") or ()) if not str(n).startswith(NOTE_PREFIX))


def _set_pretrained_cfg(model: nn.Module, cfg: dict) -> None:
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg


def _from_notes(pretrained_cfg) -> Optional[dict]:
    """The config in a timm ``pretrained_cfg``'s ``notes`` (a dict or a saved config.json's)."""
    notes = (pretrained_cfg or {}).get("notes") or ()
    for n in ([notes] if isinstance(notes, str) else notes):
        if str(n).startswith(NOTE_PREFIX):
            return json.loads(str(n)[len(NOTE_PREFIX):])
    return None


# --- reading and writing ---------------------------------------------------------------------

def _from_state_dict(sd) -> Optional[dict]:
    meta = getattr(sd, "_metadata", None) or {}
    found = [(k, v[KEY]) for k, v in meta.items() if isinstance(v, dict) and KEY in v]
    if not found:
        return None
    return json.loads(min(found, key=lambda kv: len(kv[0]))[1])   # the outermost module's


#: Where a checkpoint dict (timm's ``train.py`` and others) keeps the model's state_dict, in
#: order: the first key that holds a dict is the one loaded, so a timm checkpoint with both
#: ``state_dict`` and ``state_dict_ema`` gives the model's own weights, not the EMA's.
CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema")


def _state_dict_of(ckpt: dict) -> dict:
    """The state_dict in ``ckpt``: ``ckpt`` itself when it is one (its metadata carries a BSR
    config, or no :data:`CHECKPOINT_KEYS` key holds a dict), else the first such key's dict.
    The one rule of :func:`load_checkpoint` and :func:`saved_bsr_config`, for a dict and for a
    file alike."""
    if _from_state_dict(ckpt) is None:
        for key in CHECKPOINT_KEYS:
            if isinstance(ckpt.get(key), dict):
                return ckpt[key]
    return ckpt


def saved_bsr_config(source) -> Optional[dict]:
    """The BSR settings saved with ``source``, or None when it holds none.

    Args:
        source: a state_dict (or a checkpoint dict holding one, see :data:`CHECKPOINT_KEYS`),
            a model (its ``pretrained_cfg``, as timm fills it from a ``save_for_hf`` config), a
            ``.safetensors``/``.pth``/``.bin`` file, or a ``save_for_hf`` directory.
    """
    if isinstance(source, nn.Module):
        cfg = getattr(source, "pretrained_cfg", None)
        return _from_notes(cfg) if isinstance(cfg, dict) else None
    if isinstance(source, dict):
        return _from_state_dict(_state_dict_of(source))
    return _read(Path(source))[1]


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"path {directory}: a directory without model.safetensors or "
                     "pytorch_model.bin (not a save_for_hf output)")


def _read(path: Path) -> tuple[dict, Optional[dict]]:
    """(state_dict, bsr config or None) of a file or save_for_hf directory."""
    if path.is_dir():
        weights = _weights_file(path)
        sd, cfg = _read(weights)
        config_json = path / "config.json"
        if cfg is None and config_json.is_file():
            cfg = _from_notes(json.loads(config_json.read_text()).get("pretrained_cfg"))
        return sd, cfg
    if not path.is_file():
        raise ValueError(f"path {path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:   # SafetensorError and OSError: a clear message naming the file
            raise ValueError(f"path {path}: cannot read it as safetensors ({e})") from e
        cfg = json.loads(meta[KEY]) if KEY in meta else None
        if cfg is None:
            config_json = path.with_name("config.json")   # a save_for_hf directory
            if config_json.is_file():
                cfg = _from_notes(json.loads(config_json.read_text()).get("pretrained_cfg"))
        return sd, cfg
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch.save file, truncated, or holding arbitrary objects
        raise ValueError(f"path {path}: cannot read it as a torch checkpoint of tensors (loaded "
                         f"with weights_only=True): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    cfg = None
    if isinstance(ckpt, dict):
        ckpt = _state_dict_of(ckpt)
        cfg = _from_state_dict(ckpt)
    if cfg is None and path.with_name("config.json").is_file():
        cfg = _from_notes(json.loads(path.with_name("config.json").read_text()).get(
            "pretrained_cfg"))
    return ckpt, cfg


def save_checkpoint(model: nn.Module, path: os.PathLike) -> Path:
    """Saves the full state_dict with the BSR config: ``.safetensors`` (config in the metadata)
    or any other suffix through ``torch.save`` (config in the state_dict's metadata).

    The file is replaced atomically (:func:`bsr_kernels.checkpoint.atomic_write`): a crash
    while saving leaves the previous file whole.

    Returns:
        The path written.
    """
    path = Path(path)
    sd = model.state_dict()
    cfg = bsr_config_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        meta = {KEY: json.dumps(cfg)} if cfg else None
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))


def load_checkpoint(model: nn.Module, source: Union[os.PathLike, dict, None], strict: bool = True,
                    reprogram: bool = True) -> nn.Module:
    """Loads full weights and re-applies the BSR settings saved with them.

    Args:
        model: a plain or reprogrammed timm ViT of the same architecture.
        source: a ``.safetensors``/``.pth``/``.bin`` file, a ``save_for_hf`` directory, or a
            state_dict (or timm checkpoint dict: the first of :data:`CHECKPOINT_KEYS` it
            holds, so ``state_dict`` rather than ``state_dict_ema``). None: the weights are
            already loaded (e.g. ``timm.create_model("hf-hub:...", pretrained=True)``); only the
            settings saved in the model's ``pretrained_cfg`` are re-applied.
        strict: passed to ``load_state_dict``.
        reprogram: re-apply the saved BSR settings when they differ from the model's (a plain
            model gets reprogrammed). With False, a mismatch only warns.

    Returns:
        The same model.

    Raises:
        ValueError: the checkpoint does not fit the model (other depth, missing or unexpected
            keys with ``strict``, other shapes), or a path cannot be read; the model is then left
            unchanged (settings and weights).
    """
    where = ("the model's pretrained_cfg" if source is None else
             "source (a state_dict)" if isinstance(source, dict) else f"path {source}")
    if source is None:
        sd, cfg = None, saved_bsr_config(model)
    elif isinstance(source, dict):
        sd = _state_dict_of(source)
        cfg = _from_state_dict(sd)
    else:
        sd, cfg = _read(Path(source))
    mine = bsr_config_dict(model)
    depth = len(getattr(model, "blocks", ()))
    if isinstance(cfg, dict) and cfg.get("depth") not in (None, depth):
        raise ValueError(f"{where}: saved from a model of depth {cfg['depth']}, this model has "
                         f"{depth} blocks")
    if sd is not None:
        _check_fits(model, sd, strict, where)
    differs = cfg is not None and cfg != mine
    if differs:
        if reprogram:
            reprogram_from_dict(model, cfg)
        else:
            warnings.warn(f"the checkpoint was saved from a model reprogrammed with {cfg}, but "
                          f"this model is {'reprogrammed with ' + str(mine) if mine else 'plain'}"
                          "; its logits will differ from the saved model's", BSRConfigWarning,
                          stacklevel=2)
    if sd is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BSRConfigWarning)   # handled above
                model.load_state_dict(sd, strict=strict)
        except BaseException:
            if differs and reprogram:   # put the model's own settings back
                from .reprogram import restore
                restore(model) if mine is None else reprogram_from_dict(model, mine)
            raise
    return model


def _check_fits(model: nn.Module, sd: dict, strict: bool, where: str) -> None:
    """ValueError (before anything changes) where ``load_state_dict`` would fail: other shapes,
    and with ``strict`` missing or unexpected keys. Reprogramming keeps the keys and shapes, so
    the model's current ones are the ones to compare with."""
    own = model.state_dict()
    problems = [f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in "
                "the model" for k, v in sd.items()
                if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if strict:
        for what, keys in (("missing", [k for k in own if k not in sd]),
                           ("unexpected", [k for k in sd if k not in own])):
            if keys:
                problems.append(f"{len(keys)} {what} key(s): {', '.join(keys[:5])}"
                                f"{', ...' if len(keys) > 5 else ''}")
    if problems:
        raise ValueError(f"{where} does not fit this model ({'; '.join(problems)}); the model "
                         "is unchanged" + ("" if not strict else
                                           " (strict=False loads matching keys only)"))
