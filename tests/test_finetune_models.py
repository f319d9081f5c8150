"""bsr-finetune's starting weights (``bsr_kernels.finetune.models``): the input size a saved
model folder gives."""
from __future__ import annotations

import json

import torch


def test_local_dir_folder_of_an_older_timm_keeps_its_saved_input_size(tmp_path, monkeypatch):
    """A ``local-dir:`` folder as timm 1.0.29 and older save it: ``model_args`` give
    img_size 32, but ``pretrained_cfg.input_size`` is the architecture's default 224. With
    timm 1.0.29 the model built from it is for 32 px and its pretrained_cfg still says 224, so
    bsr-finetune's data config said 224: it trained at 224 px, the saved position embedding
    resampled (test_local_dir_model_trains_from_its_folder failed there), and a model built at
    the saved size was said to have its position embedding resampled from 224 px. The input
    size is now the built model's. timm 1.0.31 corrects the pretrained_cfg itself, so the
    stale one is put back here on every model built, as timm 1.0.29 leaves it."""
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
    cfg = model_data_config(name)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5), cfg
    assert model_input_config(name)[0] == 32
    assert model_data_config(name, img_size=48)["input_size"] == (3, 48, 48)   # explicit wins
    built, info = build_model(name, 5, pretrained=True)
    assert info["img_size"] == 32
    assert not any("resampled" in n for n in info["notes"]), info["notes"]
    _, info = build_model(name, 5, img_size=48, pretrained=True)   # a resample that happens
    assert info["img_size"] == 48
    assert any("resampled from 32x32 px to 48x48 px" in n for n in info["notes"]), info["notes"]
