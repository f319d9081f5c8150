"""bsr-finetune's inputs and what it says of them: class folders whose names are not UTF-8,
the images a batch size leaves out of every epoch, the starting-weight notes, and the learning
rate of the per-epoch history."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch

from bsr_kernels.finetune.models import create_digits_vit, digits_vit_config

from test_finetune_reliability import _folder_args, _run, _write_image_folder


def _strict_json(path):
    """json.loads refusing NaN/inf, and strings holding a lone surrogate (a '\\udce9' escape
    that json.dumps writes for a str from an undecodable file name: strict readers refuse it)."""
    def refuse(name):
        raise ValueError(f"{path}: bare {name}")

    def check(value):
        if isinstance(value, str):
            value.encode("utf-8")   # UnicodeEncodeError on a lone surrogate
        elif isinstance(value, dict):
            for k, v in value.items():
                check(k), check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        return value
    return check(json.loads(Path(path).read_text(), parse_constant=refuse))


# --- 1: a class folder whose name is not UTF-8 ----------------------------------------------

def test_a_class_folder_whose_name_is_not_utf8_trains_and_writes_strict_json(tmp_path, capsys):
    pics = tmp_path / "pics"
    cafe = os.fsdecode(b"caf\xe9")   # 'caf\udce9'
    try:
        (pics / cafe).mkdir(parents=True)
        (pics / cafe).rmdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no file names that are not UTF-8")
    _write_image_folder(pics, {cafe: 6, "dog": 6})
    out = tmp_path / "run"
    rc, _, err = _run(_folder_args(pics, out), capsys)
    assert rc == 0, err
    for path in out.rglob("*.json"):
        _strict_json(path)
    delta = _strict_json(out / "linear" / "delta.json")
    assert delta["extra"]["classes"] == ["caf\\xe9", "dog"]   # its byte, escaped
    fp = torch.load(out / "linear" / "checkpoint.pt", weights_only=True)["fingerprint"]
    assert fp["data_classes"].startswith("2 classes, sha256 ")
    # the same classes again: --resume accepts the data (its class hash is stable)
    rc, _, err = _run(["--resume", out, "--epochs", "2"], capsys)
    assert rc == 0, err


# --- 2: the images a batch size leaves out of every epoch -----------------------------------

def test_the_images_left_out_of_each_epoch_are_logged(tmp_path, capsys):
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 8, "dog": 8})
    argv = _folder_args(pics)
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    n = int(out.split(" train / ")[0].rsplit(" ", 1)[1])
    assert n % 4 == 0 and "left out" not in out          # whole batches: nothing left out
    argv[argv.index("--batch-size") + 1] = str(n - 1)    # one whole batch, 1 image left out
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert (f"linear: 1 of {n} training images are left out of each epoch (1 whole batch of "
            f"{n - 1}" in out)
    assert "a different sample is left out each epoch" in out
    argv[argv.index("--batch-size") + 1] = str(n + 1)    # one short batch: all trained
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "left out" not in out


# --- 3: --checkpoint is no start from random weights -----------------------------------------

def test_a_timm_model_with_checkpoint_is_not_said_to_start_from_random_weights(tmp_path,
                                                                                capsys):
    import timm
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 4, "dog": 4})
    ckpt = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2)
               .state_dict(), ckpt)
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", *_folder_args(pics)]
    rc, _, err = _run([*argv, "--checkpoint", ckpt], capsys)
    assert rc == 0, err
    assert "random weights" not in err
    rc, _, err = _run(argv, capsys)                       # no weights at all: still said
    assert rc == 0, err
    assert "starts from random weights (no --pretrained or --checkpoint)" in err


# --- 4: a checkpoint of another patch size --------------------------------------------------

def test_a_checkpoint_of_another_patch_size_is_named_in_a_warning(tmp_path, capsys):
    from safetensors.torch import save_file
    arch = dict(digits_vit_config()["arch"])
    patch = int(arch["patch_size"])
    arch["patch_size"] = 2 * patch
    sd = create_digits_vit(2, arch=arch).state_dict()
    assert sd["patch_embed.proj.weight"].shape[-1] == 2 * patch
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "p.safetensors"))
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 4, "dog": 4})
    rc, _, err = _run([*_folder_args(pics), "--checkpoint", tmp_path / "p.safetensors"], capsys)
    assert rc == 0, err
    assert (f"the patch embedding was resampled from {2 * patch}x{2 * patch} to "
            f"{patch}x{patch} pixel patches" in err)
    # the model's own patch size: no such warning
    same = create_digits_vit(2).state_dict()
    save_file({k: v.contiguous() for k, v in same.items()}, str(tmp_path / "same.safetensors"))
    rc, _, err = _run([*_folder_args(pics), "--checkpoint", tmp_path / "same.safetensors"],
                      capsys)
    assert rc == 0, err
    assert "patch embedding" not in err


# --- 5: the history's lr ---------------------------------------------------------------------

def test_the_history_lr_is_the_lr_schedule_for_every_method(tmp_path, capsys):
    """param_groups[0] is the head's group for linear (10x --lr) but a backbone group for full:
    the history's lr is the --lr schedule's value for every method."""
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 8, "dog": 8})
    argv = _folder_args(pics, tmp_path / "run")
    argv[argv.index("--method") + 1] = "linear,bitfit,full"
    argv[argv.index("--epochs") + 1] = "2"
    rc, _, err = _run([*argv, "--lr", "0.01", "--head-lr-scale", "10",
                       "--warmup-epochs", "0"], capsys)
    assert rc == 0, err
    with open(tmp_path / "run" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = {m: [float(r["lr"]) for r in rows if r["method"] == m]
           for m in ("linear", "bitfit", "full")}
    assert len(lrs["full"]) == 2
    assert lrs["linear"] == pytest.approx(lrs["full"], rel=1e-9)
    assert lrs["bitfit"] == pytest.approx(lrs["full"], rel=1e-9)
    assert 0 < lrs["full"][0] < 0.01 and lrs["full"][1] == pytest.approx(0.0, abs=1e-12)
