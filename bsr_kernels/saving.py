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

from timm.utils import unwrap_model

from .checkpoint import atomic_write, load_torch_file
from .config_access import bsr_config_dict, config_from_dict, reprogram_from_dict
from .delta import _META_KEY as DELTA_KEY   # where a delta keeps its config (not a full model)

__all__ = ["save_checkpoint", "load_checkpoint", "saved_bsr_config", "BSRConfigWarning",
           "attach", "detach"]

KEY = "bsr_config"
#: How the config is written into timm's ``pretrained_cfg["notes"]`` (``PretrainedCfg`` takes no
#: other keys, so a new one would break ``create_model("local-dir:...")``).
NOTE_PREFIX = "bsr_kernels.reprogram config: "


class BSRConfigWarning(UserWarning):
    """Weights saved under other BSR settings than the model's (or none) were loaded."""


#: BSR settings that change only backward (what it stores, which parameters it trains), never
#: the logits: weights saved under other values of these load without a warning.
BACKWARD_ONLY = ("memory_mode", "activation_dtype", "train_blocks", "train_norm")


def _forward_settings(d: Optional[dict]) -> Optional[dict]:
    """The settings of a BSR config dict that the logits depend on; None, as for a plain model,
    where nothing is dropped (no drop_at, or a keep_rate of 1): the blocks then compute what
    timm's do."""
    if d is None or not d.get("drop_at") or d.get("keep_rate", 0.0) >= 1.0:
        return None
    return {k: v for k, v in d.items() if k not in BACKWARD_ONLY}


def _same_forward(a: Optional[dict], b: Optional[dict]) -> bool:
    """Whether two BSR config dicts (or None, for a plain model) compute the same logits."""
    return _forward_settings(a) == _forward_settings(b)


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
    try:   # in today's form: an older config (no depth) equal to the model's compares equal
        saved = config_from_dict(_loads(saved, "load_state_dict",
                                        "in the state_dict's metadata"), module).to_dict()
    except ValueError as e:   # only a warning compares here: the weights themselves may load
        warnings.warn(f"{e}; it was not compared with this model's", BSRConfigWarning,
                      stacklevel=3)
        return
    if not _same_forward(saved, mine):
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
    if isinstance(cfg, dict) and _note(cfg) is not None:
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


def _note(pretrained_cfg) -> Optional[str]:
    """The config line (JSON text) in a timm ``pretrained_cfg``'s ``notes``, or None."""
    notes = (pretrained_cfg or {}).get("notes") or ()
    if not isinstance(notes, (str, list, tuple)):
        return None
    for n in ([notes] if isinstance(notes, str) else notes):
        if str(n).startswith(NOTE_PREFIX):
            return str(n)[len(NOTE_PREFIX):]
    return None


def _from_notes(pretrained_cfg, where: str) -> Optional[dict]:
    """The config in a timm ``pretrained_cfg``'s ``notes`` (a dict or a saved config.json's);
    ValueError naming ``where`` when it is not a JSON object."""
    note = _note(pretrained_cfg)
    return None if note is None else _loads(note, where, "in pretrained_cfg's notes")


def _loads(text, where: str, what: str) -> dict:
    """A saved config (JSON text); ValueError naming ``where`` and ``what`` (where in it) when
    it is not a JSON object. Its keys and values are checked by :func:`_checked_config`."""
    try:
        cfg = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its BSR config ({what}) is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: its BSR config ({what}) is a JSON {type(cfg).__name__}, "
                         "not an object")
    return cfg


# --- reading and writing ---------------------------------------------------------------------

def _from_state_dict(sd, where: str) -> Optional[dict]:
    meta = getattr(sd, "_metadata", None) or {}
    if not isinstance(meta, dict):
        return None
    found = [(k, v[KEY]) for k, v in meta.items() if isinstance(v, dict) and KEY in v]
    if not found:
        return None
    prefix, text = min(found, key=lambda kv: len(str(kv[0])))   # the outermost module's
    return _loads(text, where, f"in the state_dict's metadata[{prefix!r}]")


#: Where a checkpoint dict (timm's ``train.py`` and others) keeps the model's state_dict, in
#: order: the first key that holds a dict is the one loaded, so a timm checkpoint with both
#: ``state_dict`` and ``state_dict_ema`` gives the model's own weights, not the EMA's.
CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema")


def _state_dict_of(ckpt: dict, where: str) -> dict:
    """The state_dict in ``ckpt``: ``ckpt`` itself when it is one (its metadata carries a BSR
    config, or no :data:`CHECKPOINT_KEYS` key holds a dict), else the first such key's dict.
    The one rule of :func:`load_checkpoint` and :func:`saved_bsr_config`, for a dict and for a
    file alike."""
    if _from_state_dict(ckpt, where) is None:
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

    Raises:
        ValueError: a path cannot be read or is a delta checkpoint (its config is in
            :func:`bsr_kernels.delta.read_delta`'s), or the saved config is not a JSON object.
    """
    if isinstance(source, nn.Module):
        cfg = getattr(source, "pretrained_cfg", None)
        return _from_notes(cfg, "the model's pretrained_cfg") if isinstance(cfg, dict) else None
    if isinstance(source, dict):
        where = "source (a state_dict)"
        return _from_state_dict(_state_dict_of(source, where), where)
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
            cfg = _from_config_json(config_json)
        return sd, cfg
    if not path.is_file():
        raise ValueError(f"path {path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                delta = DELTA_KEY in meta and KEY not in meta
                sd = {} if delta else {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:   # SafetensorError and OSError: a clear message naming the file
            raise ValueError(f"path {path}: cannot read it as safetensors ({e})") from e
        if delta:
            raise _delta_error(path)
        cfg = _loads(meta[KEY], f"path {path}", "in its metadata") if KEY in meta else None
        from .moe import ROUTING_KEY, with_routing
        try:   # the MoE routing, where a .pth file keeps it: the state_dict's metadata
            routing = json.loads(meta.get(ROUTING_KEY, "null"))
        except ValueError:   # malformed: ignored, as load_state_dict ignores it in a .pth
            routing = None
        if isinstance(routing, dict):
            sd = with_routing(sd, routing)
        if cfg is None:
            config_json = path.with_name("config.json")   # a save_for_hf directory
            if config_json.is_file():
                cfg = _from_config_json(config_json)
        return sd, cfg
    try:
        ckpt = load_torch_file(path)
    except Exception as e:   # not a torch.save file, truncated, or holding arbitrary objects
        if _is_delta(path):   # save_delta writes safetensors whatever the suffix
            raise _delta_error(path) from None
        raise ValueError(f"path {path}: cannot read it as a torch checkpoint of tensors (loaded "
                         f"with weights_only=True): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"path {path}: holds a {type(ckpt).__name__}, not a state_dict (a dict "
                         "of tensors) or a checkpoint dict holding one")
    ckpt = _state_dict_of(ckpt, f"path {path}")
    cfg = _from_state_dict(ckpt, f"path {path}")
    if cfg is None and path.with_name("config.json").is_file():
        cfg = _from_config_json(path.with_name("config.json"))
    return ckpt, cfg


def _from_config_json(path: Path) -> Optional[dict]:
    """The config in a ``save_for_hf`` ``config.json`` (its pretrained_cfg's notes), or None;
    ValueError naming the file when it is not valid JSON or its pretrained_cfg not an object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"path {path}: cannot read it as a save_for_hf config.json "
                         f"({type(e).__name__}: {e})") from None
    pretrained = doc.get("pretrained_cfg") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(pretrained, (dict, type(None))):
        raise ValueError(f"path {path}: not a save_for_hf config.json (" + (
            f"a JSON {type(doc).__name__}, not an object" if not isinstance(doc, dict) else
            f"its pretrained_cfg is a JSON {type(pretrained).__name__}, not an object") + ")")
    return _from_notes(pretrained, f"path {path}")


def _is_delta(path: Path) -> bool:
    """Whether ``path`` is a safetensors file with a delta's config in its metadata."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return DELTA_KEY in (f.metadata() or {})
    except Exception:   # not safetensors at all
        return False


def _delta_error(path: Path) -> ValueError:
    return ValueError(f"path {path}: a bsr_kernels delta checkpoint (the fine-tuned parameters "
                      "only, for a base model), not a full checkpoint; load it with "
                      "bsr_kernels.load_delta(model, path)")


def save_checkpoint(model: nn.Module, path: os.PathLike) -> Path:
    """Saves the full state_dict with the BSR config: ``.safetensors`` (config in the metadata)
    or any other suffix through ``torch.save`` (config in the state_dict's metadata).

    The file is replaced atomically (:func:`bsr_kernels.checkpoint.atomic_write`): a crash
    while saving leaves the previous file whole. A ``torch.compile``'d or DDP-wrapped model is
    saved under its own keys (timm's ``unwrap_model``), as every function here reads it.

    Returns:
        The path written.
    """
    path = Path(path)
    model = unwrap_model(model)   # torch.compile's or DDP's wrapper: the model's own keys
    sd = model.state_dict()
    cfg = bsr_config_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        from .moe import ROUTING_KEY, routing_settings
        tensors, storages = {}, set()
        for k, v in sd.items():   # safetensors refuses tensors that share memory (tied
            t = v.detach().cpu().contiguous()          # weights): a copy for each but the first
            ptr = t.untyped_storage().data_ptr()
            tensors[k] = t.clone() if ptr in storages and t.numel() else t
            storages.add(ptr)
        meta = {KEY: json.dumps(cfg)} if cfg else {}
        routing = routing_settings(model)   # no parameter holds it (torch.save keeps it in
        if routing:                         # the state_dict's own metadata)
            meta[ROUTING_KEY] = json.dumps(routing, sort_keys=True)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                                        metadata=meta or None))
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))


def load_checkpoint(model: nn.Module, source: Union[os.PathLike, dict, None], strict: bool = True,
                    reprogram: bool = True) -> nn.Module:
    """Loads full weights and re-applies the BSR settings saved with them.

    Args:
        model: a plain or reprogrammed timm ViT of the same architecture (or one wrapped by
            ``torch.compile`` or DDP).
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
        ValueError: the checkpoint does not fit the model (other depth or prefix tokens,
            missing or unexpected keys with ``strict``, other shapes, entries that are not
            tensors or whose dtype cannot be loaded), its saved BSR config is malformed or cannot
            be applied to the model, a path cannot be read, or it is a delta checkpoint (see
            :func:`bsr_kernels.load_delta`); the model is then left unchanged (settings and
            weights).
    """
    given, model = model, unwrap_model(model)   # a compiled or DDP-wrapped model: its own
    where = ("the model's pretrained_cfg" if source is None else
             "source (a state_dict)" if isinstance(source, dict) else f"path {source}")
    if source is None:
        sd, cfg = None, saved_bsr_config(model)
    elif isinstance(source, dict):
        sd = _state_dict_of(source, where)
        cfg = _from_state_dict(sd, where)
    else:
        sd, cfg = _read(Path(source))
    mine = bsr_config_dict(model)
    if cfg is not None:
        cfg = _checked_config(model, cfg, where)
    if sd is not None:
        _check_fits(model, sd, strict, where)
        from .moe import routing_problems, saved_routing
        problems = routing_problems(model, saved_routing(sd), "the checkpoint")
        if problems:   # load_state_dict only warns: the logits would differ silently
            raise ValueError(f"{where}: its MoE blocks route otherwise than the model's ("
                             f"{'; '.join(problems[:5])}): the logits would differ; build the "
                             "model with the checkpoint's routing (to_moe top_k, renormalize); "
                             "the model is unchanged")
    differs = cfg is not None and cfg != mine
    if differs:
        if reprogram:
            try:
                reprogram_from_dict(model, cfg)
            except ValueError as e:   # a model reprogram refuses; reprogram changed nothing
                raise ValueError(f"{where}: its BSR settings cannot be applied to this model "
                                 f"({e}); the model is unchanged") from e
        elif not _same_forward(cfg, mine):
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
    return given


def _checked_config(model: nn.Module, cfg: dict, where: str) -> dict:
    """A saved config validated (:func:`~bsr_kernels.config_access.config_from_dict`) and
    checked against ``model``'s depth and prefix tokens, in today's form (``to_dict()``, so an
    older config equal to the model's compares equal); ValueError naming ``where`` otherwise."""
    try:
        config = config_from_dict(cfg, model)
    except ValueError as e:
        raise ValueError(f"{where}: its saved BSR config is malformed ("
                         f"{str(e).removeprefix('malformed BSR config: ')}); the model is "
                         "unchanged") from None
    backbone = getattr(model, "bsr_backbone", model)
    depth = len(getattr(backbone, "blocks", ()))
    if config.depth != depth:
        raise ValueError(f"{where}: saved from a model of depth {config.depth}, this model has "
                         f"{depth} blocks")
    prefix = getattr(backbone, "num_prefix_tokens", None)
    if prefix is not None and config.num_prefix_tokens != prefix:
        raise ValueError(f"{where}: saved from a model with {config.num_prefix_tokens} prefix "
                         f"tokens (class and register tokens), this model has {prefix}")
    return config.to_dict()


def _check_fits(model: nn.Module, sd: dict, strict: bool, where: str) -> None:
    """ValueError (before anything changes) where ``load_state_dict`` would fail or lose data:
    entries that are not tensors, other shapes, dtypes that cannot be copied into the model's
    (complex into real, no data), and with ``strict`` missing or unexpected keys. Reprogramming
    keeps the keys, shapes and dtypes, so the model's current ones are the ones to compare
    with."""
    own = model.state_dict()
    problems = [f"{k}: {problem}" for k, v in sd.items() if k in own
                for problem in [_unloadable(v, own[k])] if problem]
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


def _unloadable(value, mine: torch.Tensor) -> Optional[str]:
    """Why ``load_state_dict`` cannot copy a checkpoint's ``value`` into the model's tensor
    ``mine`` (or would drop part of it), or None."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__} in the checkpoint, not a tensor"
    if value.shape != mine.shape:
        return f"shape {tuple(value.shape)} in the checkpoint, {tuple(mine.shape)} in the model"
    if value.is_complex() and not mine.is_complex():
        return (f"dtype {value.dtype} in the checkpoint, {mine.dtype} in the model (its "
                "imaginary part would be lost)")
    try:   # one element, as load_state_dict's copy_ would (meta and sparse tensors fail)
        torch.empty(min(value.numel(), 1), dtype=mine.dtype).copy_(
            value[(0,) * value.dim()].reshape(1) if value.numel() else value.reshape(0))
    except Exception as e:
        return (f"a {value.dtype} tensor in the checkpoint that cannot be copied into the "
                f"model's {mine.dtype} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return None
