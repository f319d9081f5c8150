"""Models of ``bsr-finetune``: the shipped digits ViT, any timm ViT, and weight loading.

``--model bsr_digits_vit`` (the default) is a small 12-block timm ``VisionTransformer`` that
:mod:`bsr_kernels.finetune.pretrain_source` pre-trained on digits 0-4; its weights ship in
``assets/`` as safetensors with a JSON config. Any other name is a timm model name, which must
build a ``VisionTransformer``: a registry name (``vit_small_patch16_224``, with a pretrained tag
``.augreg_in21k`` if wanted) or, as timm's ``train.py`` takes them, a name with a source
prefix: ``hf-hub:org/repo`` (a Hugging Face hub repo: its config.json, and with ``--pretrained``
its weights) or ``local-dir:/path`` (a folder with timm's config.json and weights, as
``timm.models.save_for_hf`` writes it: no network).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint import load_torch_file

__all__ = [
    "DIGITS_MODEL",
    "ASSETS",
    "assets_dir",
    "digits_vit_config",
    "create_digits_vit",
    "check_model_name",
    "build_model",
    "load_weights",
    "read_state_dict",
    "model_input_config",
    "model_data_config",
    "model_patch_size",
    "check_patch_fit",
    "WeightsUnavailableError",
]

DIGITS_MODEL = "bsr_digits_vit"
ASSETS = Path(__file__).resolve().parent / "assets"
#: Environment variable naming another folder to take the digits model from (one that
#: ``pretrain_source --out DIR`` wrote).
ASSETS_ENV = "BSR_FINETUNE_ASSETS"


def assets_dir() -> Path:
    """The folder of the digits model: ``$BSR_FINETUNE_ASSETS`` or the shipped :data:`ASSETS`."""
    return Path(os.environ.get(ASSETS_ENV) or ASSETS)


class WeightsUnavailableError(RuntimeError):
    """Hub weights asked for (``--pretrained``) that cannot be fetched (typically: offline)."""


def digits_vit_config(assets: Optional[Path] = None) -> dict:
    """The JSON config of the shipped digits model (architecture, input size, normalisation).

    Raises:
        FileNotFoundError: if the asset is missing (rebuild it with
            ``python -m bsr_kernels.finetune.pretrain_source``).
    """
    path = Path(assets or assets_dir()) / f"{DIGITS_MODEL}.json"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped model config {path} is missing; rebuild it with "
                                "`python -m bsr_kernels.finetune.pretrain_source`")
    return json.loads(path.read_text())


def _check_sha256(weights: Path, config: dict) -> None:
    """Refuses digits-model weights that are not the ones its JSON config describes (a rebuild
    stopped between writing the two files, or files mixed from two folders)."""
    import hashlib

    want = config.get("sha256")
    if not weights.is_file():
        raise ValueError(f"the digits model's weights {weights} are missing; rebuild them with "
                         "`python -m bsr_kernels.finetune.pretrain_source`")
    got = hashlib.sha256(weights.read_bytes()).hexdigest()
    if got != want:
        raise ValueError(f"{weights} is not the file its config {DIGITS_MODEL}.json describes "
                         f"(sha256 {got[:12]}..., the config says {str(want)[:12]}...); rebuild "
                         "both with `python -m bsr_kernels.finetune.pretrain_source`")


def create_digits_vit(num_classes: int, img_size: Optional[int] = None,
                      arch: Optional[dict] = None) -> nn.Module:
    """A randomly initialised digits ViT (timm ``VisionTransformer``).

    Args:
        num_classes: classifier outputs.
        img_size: input side; default the config's.
        arch: architecture keywords (``img_size``, ``patch_size``, ``embed_dim``, ``depth``,
            ``num_heads``, ``mlp_ratio``); default the shipped config's.
    """
    from timm.models.vision_transformer import VisionTransformer

    arch = dict(arch if arch is not None else digits_vit_config()["arch"])
    if img_size is not None:
        arch["img_size"] = img_size
    return VisionTransformer(num_classes=num_classes, **arch)


def model_source(name: str) -> Optional[tuple[str, str]]:
    """``(source, id)`` of a timm model name with a source prefix (``("hf-hub", "org/repo")``,
    ``("local-dir", "/path")``), None for a registry name (or the digits model).

    Raises:
        ValueError: naming ``--model``, for a prefix timm does not know.
    """
    from timm.models import parse_model_name

    if name == DIGITS_MODEL or ":" not in name:
        return None
    try:
        source, model_id = parse_model_name(name)
    except (ValueError, AssertionError) as e:   # older timm asserts on an unknown scheme
        raise ValueError(f"--model {name}: {e}" if str(e) else f"--model {name}: an unknown "
                         "source prefix (timm takes hf-hub: and local-dir:)") from e
    return (source, model_id) if source else None


def _needs_hub(name: str, pretrained: bool) -> bool:
    """Whether building ``name`` reads the Hugging Face hub: registry weights
    (``pretrained``), or an ``hf-hub:`` model's config even without its weights."""
    source = model_source(name)
    return source[0] == "hf-hub" if source is not None else pretrained


def _offline(name: str, pretrained: bool) -> bool:
    """Whether building ``name`` reads the hub (:func:`_needs_hub`) and the hub is out of reach
    (``HF_HUB_OFFLINE=1``, or no answer within a few seconds: :func:`hub_reachable`)."""
    return _needs_hub(name, pretrained) and (_hub_offline() or not hub_reachable())


def _create_timm(name: str, pretrained: bool = False, offline: Optional[bool] = None,
                 **kwargs) -> nn.Module:
    """``timm.create_model``; with the hub out of reach (``offline``, default
    :func:`_offline`) from huggingface_hub's local cache only: offline, its client would
    retry for about a minute before failing."""
    import timm

    if offline is None:
        offline = _offline(name, pretrained)
    with _offline_hub() if offline else contextlib.nullcontext():
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def check_model_name(name: str) -> None:
    """Raises ValueError naming ``--model`` when ``name`` is neither the digits ViT nor timm's
    (a registry name, or one with a source prefix; a ``local-dir:`` folder must hold a
    config.json)."""
    import timm

    if not isinstance(name, str) or not name:
        raise ValueError(f"--model must be a model name, got {name!r}")
    if name == DIGITS_MODEL or timm.is_model(name):
        return
    source = model_source(name)
    if source is not None:
        if source[0] == "local-dir" and not (Path(source[1]) / "config.json").is_file():
            raise ValueError(f"--model {name}: {source[1]} holds no config.json (a local-dir: "
                             "model is a folder with timm's config.json and weights, as "
                             "timm.models.save_for_hf writes it)")
        return
    if "/" in name or "\\" in name:   # a hub repo or a folder, without timm's prefix
        hint = f" (a hub repo is hf-hub:{name}, a folder local-dir:{name})"
    else:
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5] if len(name) > 2 else []
        hint = f" (close: {', '.join(close)})" if close else ""
    raise ValueError(f"--model {name}: unknown model; use {DIGITS_MODEL} or a timm ViT name such "
                     f"as vit_small_patch16_224 or deit_tiny_patch16_224{hint}")


def read_state_dict(path) -> dict:
    """Reads a state dict from a safetensors, timm or ``bsr-finetune`` checkpoint file.

    Loads with ``weights_only=True``, allowing ``argparse.Namespace`` (the ``args`` of a
    checkpoint that timm's train.py wrote, as timm's own loader does). Unwraps
    ``{"model": ...}`` / ``{"state_dict": ...}`` and a DDP ``module.`` prefix.

    Raises:
        ValueError: if the file is missing, unreadable or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = load_torch_file(path)   # a timm train.py checkpoint's args too
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message has terminal bold codes
        raise ValueError(f"--checkpoint {path}: cannot read it ({type(e).__name__}: {why}); is "
                         "it a complete PyTorch or safetensors checkpoint?") from e
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor)
                                                      for v in sd.values()):
        raise ValueError(f"--checkpoint {path}: holds no state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path, report: bool = False):
    """Loads a checkpoint into a timm ViT, resampling position embeddings to the model's grid.

    A classifier head of another shape (another number of classes) is skipped and stays
    freshly initialised.

    Returns:
        The names of the skipped head parameters; with ``report``, ``(skipped, notes)`` where
        notes says which position embedding was resampled.

    Raises:
        ValueError: if the file cannot be read, or its weights do not fit the model.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_state_dict(path)
    pos_before = sd.get("pos_embed")
    proj_before = sd.get("patch_embed.proj.weight")   # checkpoint_filter_fn resamples it too
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--checkpoint {path}: its weights do not fit the model ({e})") from e
    own = model.state_dict()
    skipped = [k for k in list(sd) if k.startswith(("head.", "head_dist."))
               and k in own and own[k].shape != sd[k].shape]
    for k in skipped:
        del sd[k]
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and k not in skipped]
    unexpected = [k for k in sd if k not in own]
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append(f"{len(bad)} of another shape ({'; '.join(bad[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        raise ValueError(f"--checkpoint {path}: does not match the model: "
                         + ", ".join(parts) + " parameters")
    model.load_state_dict(sd, strict=False)
    if not report:
        return skipped
    notes = []
    pos_after = sd.get("pos_embed")
    if pos_before is not None and pos_after is not None and pos_before.shape != pos_after.shape:
        notes.append(f"weights {path}: the position embedding was resampled from "
                     f"{pos_before.shape[1]} to {pos_after.shape[1]} tokens to fit "
                     f"{model.patch_embed.img_size[0]} px inputs")
    proj_after = sd.get("patch_embed.proj.weight")
    if (proj_before is not None and proj_after is not None and proj_before.dim() == 4
            and proj_before.shape[-2:] != proj_after.shape[-2:]):
        (bh, bw), (ah, aw) = proj_before.shape[-2:], proj_after.shape[-2:]
        notes.append(f"weights {path}: the patch embedding was resampled from {bh}x{bw} to "
                     f"{ah}x{aw} pixel patches to fit the model's patch size (the checkpoint "
                     f"was trained with {bh}x{bw} patches: its features only approximate "
                     f"theirs; a --model with patch size {bh} uses them as trained)")
    return skipped, notes


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT`` or huggingface.co) answers a TCP connect
    within ``timeout`` seconds. Run in a thread, so a hanging DNS lookup cannot stall it."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http"
                                                                  else 443)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _offline_hub():
    """Makes huggingface_hub use its cache only (as ``HF_HUB_OFFLINE=1`` would), for a while."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def model_data_config(name: str, img_size: Optional[int] = None) -> dict:
    """The model's data config as timm resolves it, without building the model.

    Args:
        name: :data:`DIGITS_MODEL` or a timm model name (its ``pretrained_cfg`` is metadata
            shipped with timm: no download).
        img_size: an explicit input side, which wins over the model's.

    Returns:
        ``{"input_size": (3, S, S), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``
        (timm's :func:`~timm.data.resolve_data_config` keys).
    """
    check_model_name(name)
    if name == DIGITS_MODEL:
        cfg = digits_vit_config()
        side = img_size or int(cfg["arch"]["img_size"])
        return {"input_size": (3, side, side), "interpolation": "bilinear",
                "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "crop_pct": 1.0,
                "crop_mode": "center"}
    import timm
    from timm.data import resolve_data_config
    if model_source(name) is not None:   # the source's config.json: build on the meta device
        meta = _meta_model(name)
        out = resolve_data_config({}, model=meta)
        # the side the model is built for (its config's model_args): timm 1.0.29 and older
        # wrote the architecture's default input_size (224) in the pretrained_cfg of a folder
        # saved at another img_size, and a model built for that side would resample its
        # position embedding and train at that resolution
        built = getattr(getattr(meta, "patch_embed", None), "img_size", None)
        if built is not None:
            out["input_size"] = (3, *(int(s) for s in built))
    else:
        pcfg = timm.get_pretrained_cfg(name)
        out = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    side = img_size or int(out["input_size"][-1])
    out["input_size"] = (3, side, side)
    out["mean"], out["std"] = tuple(out["mean"]), tuple(out["std"])
    return out


def model_patch_size(name: str) -> Optional[tuple]:
    """The (height, width) of model ``name``'s patches, without its weights or memory (a timm
    model is built on the meta device, in well under a second); None for a model without a
    ``patch_embed`` (not a ViT: :func:`build_model` refuses it)."""
    check_model_name(name)
    if name == DIGITS_MODEL:
        side = int(digits_vit_config()["arch"]["patch_size"])
        return (side, side)
    patch = getattr(getattr(_meta_model(name), "patch_embed", None), "patch_size", None)
    return None if patch is None else tuple(int(p) for p in patch)


def check_patch_fit(name: str, img_size: int) -> None:
    """Raises a ValueError naming --img-size when ``img_size`` is not a whole number of model
    ``name``'s patches: timm would drop the last pixels silently."""
    patch = model_patch_size(name)
    if patch is not None and (img_size % patch[0] or img_size % patch[1]):
        raise ValueError(f"--img-size {img_size}: not a whole number of {name}'s "
                         f"{patch[0]}x{patch[1]} px patches; pick a multiple of {patch[0]}")


def _meta_model(name: str) -> nn.Module:
    """Timm model ``name`` without weights, on the meta device (no memory, well under a second;
    an ``hf-hub:`` model reads its config.json from the hub, or offline from the cache).

    Raises:
        WeightsUnavailableError: an ``hf-hub:`` model whose config cannot be fetched.
    """
    try:
        with torch.device("meta"):
            return _create_timm(name, pretrained=False)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        if not _needs_hub(name, False):
            raise
        raise WeightsUnavailableError(
            f"--model {name}: could not fetch its config.json from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:300]}). Offline, use a local-dir: folder or a "
            "registry name with --checkpoint") from e


def model_input_config(name: str, img_size: Optional[int] = None
                       ) -> tuple[int, tuple, tuple]:
    """``(img_size, mean, std)`` of a model, without building it (see
    :func:`model_data_config`).

    Args:
        name: :data:`DIGITS_MODEL` or a timm model name.
        img_size: an explicit input side, which wins over the model's.
    """
    cfg = model_data_config(name, img_size)
    return int(cfg["input_size"][-1]), cfg["mean"], cfg["std"]


def build_model(name: str, num_classes: int, img_size: Optional[int] = None,
                pretrained: bool = False, checkpoint: Optional[str] = None
                ) -> tuple[nn.Module, dict]:
    """Creates the model to fine-tune, with its starting weights.

    Args:
        name: :data:`DIGITS_MODEL` or a timm ViT name.
        num_classes: outputs of the new classifier head.
        img_size: input side; default the model's own.
        pretrained: the name's own weights: timm hub weights (online, or from the hub
            cache), a ``local-dir:`` folder's (no network); the digits model always starts
            from its shipped weights unless ``checkpoint`` is given.
        checkpoint: a local checkpoint file to start from.

    Returns:
        (model, info) with info holding ``img_size``, ``mean``, ``std``, ``weights`` (where
        the starting weights came from) and ``notes`` (warnings for the user: random
        weights, a new classifier head, a resampled position embedding).

    Raises:
        ValueError: unknown or non-ViT model, bad checkpoint.
        WeightsUnavailableError: hub weights asked for but not reachable.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    check_model_name(name)
    notes: list = []
    if name == DIGITS_MODEL:
        cfg = digits_vit_config()
        model = create_digits_vit(num_classes, img_size)
        if checkpoint is None:
            shipped = assets_dir() / f"{DIGITS_MODEL}.safetensors"
            _check_sha256(shipped, cfg)
            notes += load_weights(model, shipped, report=True)[1]
            weights = f"shipped {DIGITS_MODEL} (pre-trained on digits 0-4)"
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    else:
        kwargs = {"num_classes": num_classes}
        if img_size is not None:
            kwargs["img_size"] = img_size
        hub = pretrained and checkpoint is None   # "hub": the name's own weights, wherever
        source = model_source(name)
        local = source is not None and source[0] == "local-dir"
        offline = _offline(name, hub)
        try:
            model = _create_timm(name, pretrained=hub, offline=offline, **kwargs)
        except TypeError as e:
            raise ValueError(f"--model {name}: cannot build it with {kwargs} ({e}); it is "
                             "probably not a ViT") from e
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            if local:
                raise ValueError(f"--model {name}: cannot build it from {source[1]} "
                                 f"({type(e).__name__}: {str(e)[:300]})") from e
            if _needs_hub(name, hub):
                if source is None:   # a registry model: is it the model or its weights?
                    try:   # the model itself, without weights (meta device: no memory, no time)
                        with torch.device("meta"):
                            timm.create_model(name, pretrained=False, **kwargs)
                    except Exception as build:  # noqa: BLE001
                        raise ValueError(f"--model {name}: cannot build it with {kwargs} "
                                         f"({type(build).__name__}: {build})") from build
                where = ("the Hugging Face hub is not reachable and they are not in the local "
                         "cache" if offline else "the download failed")
                what = (f"--pretrained: could not fetch the hub weights of {name}" if hub
                        else f"--model {name}: could not fetch its config.json from the hub")
                raise WeightsUnavailableError(
                    f"{what}: {where} "
                    f"({type(e).__name__}: {str(e)[:300]}). Offline, pass a local file with "
                    "--checkpoint or a local-dir: folder, or download once online (the hub "
                    "files are cached) and set HF_HUB_OFFLINE=1 to use the cache without "
                    "network retries") from e
            raise
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"--model {name}: a {type(model).__name__}, not a ViT; "
                             "bsr-finetune needs a timm VisionTransformer (vit_*, deit_*)")
        weights = ("random init" if not hub else f"local folder {source[1]}" if local
                   else "timm hub")
        data_cfg = timm.data.resolve_data_config({}, model=model)
        mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
        if hub:
            notes += _hub_surgery(model, name, num_classes,
                                  "its weights" if local else "the hub weights")
        elif checkpoint is None:   # --checkpoint's weights are loaded below
            notes.append(f"--model {name} starts from random weights (no --pretrained or "
                         "--checkpoint): fine-tuning methods assume pre-trained weights, so "
                         "expect low accuracy")
    if checkpoint is not None:
        skipped, resized = load_weights(model, checkpoint, report=True)
        weights = f"checkpoint {checkpoint}"
        if skipped:
            notes.append(f"--checkpoint {checkpoint}: its classifier head has another shape "
                         f"({', '.join(skipped)}); the model's {num_classes}-class head starts "
                         "from random weights")
        notes += resized
    side = model.patch_embed.img_size
    return model, {"img_size": int(side[0]), "mean": mean, "std": std, "weights": weights,
                   "notes": notes}


def _hub_surgery(model: nn.Module, name: str, num_classes: int,
                 weights: str = "the hub weights") -> list:
    """What timm changed on the model's pre-trained weights (``weights`` names them in the
    messages) to fit ``model``: a new head, a resized position embedding (as messages)."""
    notes = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_classes = cfg.get("num_classes")
    if hub_classes and hub_classes != num_classes:
        notes.append(f"--pretrained {name}: {weights} have a {hub_classes}-class head; a "
                     f"new {num_classes}-class head starts from random weights")
    # the side the weights were made for: a folder's saved architecture, not its
    # pretrained_cfg, which timm 1.0.29 and older left at the architecture's default
    size = model_data_config(name)["input_size"]
    side = model.patch_embed.img_size
    if size and tuple(size[-2:]) != tuple(side):
        notes.append(f"--pretrained {name}: the position embedding was resampled from "
                     f"{size[-2]}x{size[-1]} px to {side[0]}x{side[1]} px")
    return notes
