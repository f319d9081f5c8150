"""bsr-finetune's starting weights (``bsr_kernels.finetune.models``): the input size a saved
model folder gives, and how the Hugging Face hub is reached."""
from __future__ import annotations

import json

import pytest
import torch


def test_local_dir_folder_of_an_older_timm_keeps_its_saved_input_size(tmp_path, monkeypatch):
    """A ``local-dir:`` folder as timm 1.0.29 and older save it: ``model_args`` give
    img_size 32, but ``pretrained_cfg.input_size`` is the architecture's default 224. With
    timm 1.0.29 the model built from it is for 32 px and its pretrained_cfg still says 224, so
    bsr-finetune's data config said 224: it trained at 224 px, the saved position embedding
    resampled (test_local_dir_model_trains_from_its_folder failed there), and a model built at
    the saved size was said to have its position embedding resampled from 224 px. The input
    size is now the built model's. timm 1.0.31 corrects the pretrained_cfg itself, so the
    stale one is put back here on every model built, as timm 1.0.29 leaves it. Nothing here
    reaches for the network (the hub is not even probed)."""
    import timm
    from timm.models import save_for_hf

    from bsr_kernels.finetune.models import build_model, model_data_config, model_input_config
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **arch)
    folder = tmp_path / "vit"
    save_for_hf(model, folder, model_config={"model_args": arch}, safe_serialization=True)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["pretrained_cfg"]["input_size"] = [3, 224, 224]   # as timm 1.0.29 writes it
    config["model_args"] = arch
    path.write_text(json.dumps(config))
    name = f"local-dir:{folder}"
    from bsr_kernels.finetune import models
    create = models._create_timm

    def as_timm_1_0_29(*args, **kwargs):
        m = create(*args, **kwargs)
        m.pretrained_cfg = dict(m.pretrained_cfg, input_size=(3, 224, 224))
        return m
    monkeypatch.setattr(models, "_create_timm", as_timm_1_0_29)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a local-dir: model probed the Hugging Face hub")
    monkeypatch.setattr(models, "hub_reachable", no_network)   # a folder needs no network
    cfg = model_data_config(name)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5), cfg
    assert model_input_config(name)[0] == 32
    assert model_data_config(name, img_size=48)["input_size"] == (3, 48, 48)   # explicit wins
    built, info = build_model(name, 5, pretrained=True)
    assert info["img_size"] == 32
    assert not any("resampled" in n for n in info["notes"]), info["notes"]
    assert any("a 10-class head; a new 5-class head" in n for n in info["notes"]), info["notes"]
    same, info = build_model(name, 10, pretrained=True)   # the folder's own head: kept, unsaid
    assert info["notes"] == [] and torch.equal(same.head.weight, model.head.weight)
    _, info = build_model(name, 5, img_size=48, pretrained=True)   # a resample that happens
    assert info["img_size"] == 48
    assert any("resampled from 32x32 px to 48x48 px" in n for n in info["notes"]), info["notes"]


def test_hub_reachable_probes_the_endpoints_host_and_port(monkeypatch):
    """hub_reachable connects to $HF_ENDPOINT's host at its port (a mirror's own port, not
    just 80 or 443): a listening port answers, the same port closed does not."""
    import socket

    from bsr_kernels.finetune.models import hub_reachable
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        assert hub_reachable(timeout=2.0)
    finally:
        server.close()
    assert not hub_reachable(timeout=2.0)


def test_an_offline_build_reads_the_hub_cache_only_while_it_builds(monkeypatch):
    """With the hub out of reach a timm model is built with huggingface_hub in offline mode
    (its cache only, no retries); the mode is put back afterwards, after a failed build too.
    ``HF_HUB_OFFLINE`` in the environment says the hub is out of reach without probing it."""
    import timm
    from huggingface_hub import constants

    from bsr_kernels.finetune import models
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def create(name, pretrained=False, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        if name == "broken":
            raise OSError("not in the cache")
        return name
    monkeypatch.setattr(timm, "create_model", create)
    assert models._create_timm("vit_x", pretrained=True, offline=True) == "vit_x"
    assert constants.HF_HUB_OFFLINE is False
    with pytest.raises(OSError, match="not in the cache"):
        models._create_timm("broken", pretrained=True, offline=True)
    assert constants.HF_HUB_OFFLINE is False
    models._create_timm("vit_x", pretrained=True, offline=False)
    assert seen == [True, True, False]
    # HF_HUB_OFFLINE set (as huggingface_hub reads it) is offline: cache only, no probe
    monkeypatch.setattr(models, "hub_reachable", lambda: pytest.fail("probed the hub"))
    for value in ("1", "true", "ON"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        models._create_timm("vit_x", pretrained=True)
        assert seen[-1] is True, value


def test_a_timm_vit_normalises_as_its_weights_were_trained_and_other_families_are_refused():
    """build_model: a timm ViT's mean and std are its own pretrained config's (DeiT's the
    ImageNet ones, not the 0.5 of the augreg ViTs); a timm model that builds at the size asked
    for but is no VisionTransformer (EVA-02) is refused naming --model."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from bsr_kernels.finetune.models import build_model
    _, info = build_model("deit_tiny_patch16_224", 3, img_size=32)
    assert info["mean"] == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert info["std"] == pytest.approx(IMAGENET_DEFAULT_STD)
    with pytest.raises(ValueError, match="--model eva02_tiny_patch14_224: a Eva, not a ViT"):
        build_model("eva02_tiny_patch14_224", 3, img_size=28)
