"""bsr-finetune end to end on tiny configurations, its data pieces, and its error messages."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bsr_kernels
from bsr_kernels.finetune import cli
from bsr_kernels.finetune.data import (DIGITS_TARGET_CLASSES, GlobalBatchSampler, ShardSampler,
                                       digits_split)
from bsr_kernels.finetune.models import (DIGITS_MODEL, assets_dir, build_model,
                                         digits_vit_config, load_weights)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--batch-size", "128", "--timing-rounds", "1", "--profile-batch", "2",
        "--samples", "2", "--no-progress"]


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_accuracy_counts_test_images(accuracy, img_size):
    """``accuracy`` is correct / total over the digits test set: a whole number of its images."""
    n = len(digits_split(DIGITS_TARGET_CLASSES, img_size)[1])
    correct = accuracy * n
    assert abs(correct - round(correct)) < 1e-6 and 0 <= round(correct) <= n, (accuracy, n)


# --- the shipped model and data ------------------------------------------------------------

def test_shipped_checkpoint_is_small_and_described():
    cfg = digits_vit_config()
    weights = assets_dir() / f"{DIGITS_MODEL}.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    assert cfg["arch"]["depth"] == 12                      # BSR's defaults apply
    assert cfg["recipe"]["source_test_accuracy"] >= 0.95
    assert cfg["rebuild"].startswith("python -m bsr_kernels.finetune.pretrain_source")
    import hashlib
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == cfg["sha256"]


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--img-size", "0"),
                                         ("--embed-dim", "-4"), ("--lr", "0"),
                                         ("--threads", "0"), ("--seed", "-1")])
def test_pretrain_source_refuses_sizes_and_epochs_below_1(flag, value, tmp_path, capsys):
    """The rebuild of the shipped model refuses --epochs 0 (it wrote an untrained model) and
    other sizes below 1, naming the option, before anything is trained or written."""
    from bsr_kernels.finetune import pretrain_source
    with pytest.raises(SystemExit) as e:
        pretrain_source.main(["--out", str(tmp_path), flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "4"], "at least 8 px"), (["--img-size", "18"], "not a whole number"),
    (["--patch-size", "32"], "at least 2 patches"), (["--embed-dim", "30"], "multiple of the 4")])
def test_pretrain_source_refuses_an_architecture_that_cannot_build(argv, message, tmp_path,
                                                                    capsys):
    """--img-size 18 (patch 4) trained and wrote a model that bsr-finetune then refused naming
    an --img-size the user never passed; the others stopped with a traceback."""
    from bsr_kernels.finetune import pretrain_source
    with pytest.raises(SystemExit) as e:
        pretrain_source.main(["--out", str(tmp_path), "--epochs", "1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[0]}" in err and message in err, err
    assert not any(tmp_path.iterdir())


def test_pretrain_source_passes_its_options_on_and_writes_what_it_trained(tmp_path,
                                                                          monkeypatch, capsys):
    """The smallest architecture main accepts (8 px, two 4 px patches per side) is accepted;
    --embed-dim, --lr, --seed, --epochs and --threads reach the training, and the JSON holds
    the architecture, the training's record and the SHA-256 of the weights written (the
    training itself is replaced: a full rebuild takes minutes)."""
    from safetensors.torch import load_file

    from bsr_kernels.finetune import pretrain_source
    from bsr_kernels.finetune.models import create_digits_vit
    seen = {}

    def fake_pretrain(arch, **kw):
        seen.update(arch=arch, kw=kw, threads=torch.get_num_threads())
        torch.manual_seed(11)
        record = {"epochs": kw["epochs"], "seed": kw["seed"], "source_test_accuracy": 0.5,
                  "train_images": 601, "test_images": 300}
        return create_digits_vit(5, arch=arch).eval(), record

    monkeypatch.setattr(pretrain_source, "pretrain", fake_pretrain)
    threads = torch.get_num_threads()
    try:
        assert pretrain_source.main(["--out", str(tmp_path), "--epochs", "3", "--img-size", "8",
                                     "--patch-size", "4", "--embed-dim", "12", "--lr", "0.002",
                                     "--seed", "5", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    arch = dict(pretrain_source.DEFAULT_ARCH, img_size=8, patch_size=4, embed_dim=12)
    assert seen == {"arch": arch, "kw": {"epochs": 3, "lr": 0.002, "seed": 5}, "threads": 2}
    cfg = json.loads((tmp_path / f"{DIGITS_MODEL}.json").read_text())
    weights = tmp_path / f"{DIGITS_MODEL}.safetensors"
    assert cfg["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert cfg["arch"] == arch and cfg["source_classes"] == [0, 1, 2, 3, 4]
    assert cfg["recipe"] == {"epochs": 3, "seed": 5, "source_test_accuracy": 0.5,
                             "train_images": 601, "test_images": 300}
    assert cfg["built_with"]["threads"] == 2
    torch.manual_seed(11)
    want = create_digits_vit(5, arch=arch).state_dict()
    got = load_file(str(weights))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert "source accuracy 50.00%" in capsys.readouterr().out


def test_pretrain_records_the_recipe_it_ran():
    """pretrain's record: the shift used (-1 stands for img_size // 8, 0 for none), the seed,
    a split of the source digits 0-4 holding out a third of each class (the shipped model's
    601 / 300), and the accuracy of the returned model on the held-out third, evaluated after
    the last epoch even when that is not a tenth one. A 1-block model, 1 epoch of a few steps."""
    from bsr_kernels.finetune.data import DIGITS_SOURCE_CLASSES
    from bsr_kernels.finetune.pretrain_source import MEAN, STD, pretrain
    arch = {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2,
            "mlp_ratio": 1.0}
    lines = []
    model, record = pretrain(arch, epochs=1, batch_size=128, seed=3, log=lines.append)
    shipped = digits_vit_config()["recipe"]
    assert (record["train_images"], record["test_images"]) == (shipped["train_images"],
                                                               shipped["test_images"])
    assert record["max_shift"] == 1 and record["seed"] == 3 and record["epochs"] == 1
    _, test = digits_split(DIGITS_SOURCE_CLASSES, 8, MEAN, STD)
    with torch.no_grad():
        acc = (model(test.images).argmax(-1) == test.labels).float().mean().item()
    assert acc > 0 and record["source_test_accuracy"] == acc
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1: ")
    _, record = pretrain(arch, epochs=1, batch_size=601, max_shift=0, log=lines.append)
    assert record["max_shift"] == 0 and record["seed"] == 0


def test_digits_weights_that_do_not_match_their_config_are_refused(tmp_path, monkeypatch):
    """A rebuild stopped between writing the weights and the JSON left new weights beside the
    old config, which loaded silently (resampled position embedding, ~20 % accuracy). A config
    without the weights' checksum cannot vouch for them: refused too."""
    import shutil
    for suffix in (".safetensors", ".json"):
        shutil.copy(assets_dir() / f"{DIGITS_MODEL}{suffix}", tmp_path)
    monkeypatch.setenv("BSR_FINETUNE_ASSETS", str(tmp_path))
    model, _ = build_model(DIGITS_MODEL, 5)      # the pair as shipped loads
    assert model.num_classes == 5
    config = tmp_path / f"{DIGITS_MODEL}.json"
    shipped = config.read_text()
    config.write_text(json.dumps({k: v for k, v in json.loads(shipped).items()
                                  if k != "sha256"}))
    with pytest.raises(ValueError, match="is not the file its config"):   # no checksum: no
        build_model(DIGITS_MODEL, 5)                                      # proof of the pair
    config.write_text(shipped)
    weights = tmp_path / f"{DIGITS_MODEL}.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01                            # one bit of one weight changed
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="is not the file its config .* describes"):
        build_model(DIGITS_MODEL, 5)
    weights.unlink()
    with pytest.raises(ValueError, match="weights .* are missing"):
        build_model(DIGITS_MODEL, 5)


def test_shipped_model_knows_the_source_task():
    """The shipped weights really are a digits 0-4 classifier (held-out source images)."""
    from bsr_kernels.finetune.data import DIGITS_SOURCE_CLASSES
    from bsr_kernels.finetune.models import create_digits_vit, load_weights
    cfg = digits_vit_config()
    model = create_digits_vit(5)
    load_weights(model, assets_dir() / f"{DIGITS_MODEL}.safetensors")
    _, test = digits_split(DIGITS_SOURCE_CLASSES, cfg["arch"]["img_size"], cfg["mean"],
                           cfg["std"])
    with torch.no_grad():
        acc = (model.eval()(test.images).argmax(-1) == test.labels).float().mean().item()
    assert acc == pytest.approx(cfg["recipe"]["source_test_accuracy"], abs=0.01)


def test_digits_split_is_stratified_real_and_fixed():
    train, test = digits_split(DIGITS_TARGET_CLASSES, 16)
    assert train.images.shape[1:] == (3, 16, 16)
    from sklearn.datasets import load_digits
    assert len(train) + len(test) == int((load_digits().target >= 5).sum())   # each 5-9, once
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(5))
    counts = torch.bincount(test.labels)
    assert counts.min() >= 55 and counts.max() <= 62         # a third of each class
    assert train.images.std() > 0.3                          # real images, not constants
    train2, test2 = digits_split(DIGITS_TARGET_CLASSES, 16)
    assert torch.equal(test.images, test2.images)
    # Random-shift augmentation: each draw is the image moved by up to 2 pixels.
    shifted, _ = digits_split(DIGITS_TARGET_CLASSES, 16, max_shift=2)
    orig = train.images[0]
    torch.manual_seed(0)
    draws = [shifted[0][0] for _ in range(20)]
    assert len({d.sum().item() for d in draws}) > 1
    for d in draws:
        assert any(torch.equal(d[:, 2:-2, 2:-2], orig[:, 2 + dy:14 + dy, 2 + dx:14 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


@pytest.mark.parametrize("s", [1, 2])
def test_random_shift_draws_every_offset_up_to_max_shift_replicating_edges(s):
    """Each draw is the image moved by (dy, dx), both in -max_shift .. max_shift, the pixels
    moved in from outside copying the nearest edge pixel; over enough draws every offset
    occurs. Random images: no two offsets give the same picture. The test part of
    digits_split is never shifted."""
    from bsr_kernels.finetune.data import TensorImageDataset
    g = torch.Generator().manual_seed(s)
    images, h, w = torch.randn(2, 3, 7, 9, generator=g), 7, 9
    ds = TensorImageDataset(images, torch.tensor([3, 1]), max_shift=s)

    def moved(x, dy, dx):   # pixel (i, j) of the result is pixel (i + dy, j + dx), clamped
        rows = (torch.arange(h) + dy).clamp(0, h - 1)
        cols = (torch.arange(w) + dx).clamp(0, w - 1)
        return x[:, rows][:, :, cols]

    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(15 * len(offsets)):
        i = len(seen) % 2
        x, label = ds[i]
        assert label == [3, 1][i]
        match = [o for o in offsets if torch.equal(x, moved(images[i], *o))]
        assert len(match) == 1, match
        seen.add(match[0])
    assert seen == set(offsets)
    _, test = digits_split(DIGITS_TARGET_CLASSES, 8, max_shift=s)
    assert all(torch.equal(test[i][0], test.images[i]) for i in range(0, len(test), 9))


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (37, 6, 3), (64, 8, 1), (5, 4, 2)])
def test_global_batches_do_not_depend_on_the_number_of_processes(n, batch, world):
    single = GlobalBatchSampler(n, batch, 0, 1, seed=7)
    shards = [GlobalBatchSampler(n, batch, r, world, seed=7) for r in range(world)]
    for epoch in (0, 3):
        for s in [single, *shards]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in shards]
        for b, whole in enumerate(single):
            assert sorted(sum((pr[b] for pr in per_rank), [])) == sorted(whole)
            assert len(whole) == batch
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first or n <= batch


@pytest.mark.parametrize("n,batch,world", [(5, 8, 4), (1, 2, 2), (6, 8, 4), (13, 6, 3),
                                            (3, 8, 4)])
def test_a_short_last_batch_gives_every_process_images(n, batch, world):
    """drop_last=False: the last global batch was cut into ceil(len / world) slices, so with
    5 images on 4 processes the last got none (IndexError in its DataLoader, and the others
    waited for it). Now the slices differ by at most one image, and a batch smaller than the
    number of processes is cycled to one image each, as torch's DistributedSampler pads."""
    single = GlobalBatchSampler(n, batch, 0, 1, seed=3, drop_last=False)
    shards = [GlobalBatchSampler(n, batch, r, world, seed=3, drop_last=False)
              for r in range(world)]
    whole = list(single)[-1]
    last = [list(s)[-1] for s in shards]
    sizes = sorted(len(p) for p in last)
    assert sizes[0] >= 1 and sizes[-1] - sizes[0] <= 1, last
    got = sum(last, [])
    assert sorted(set(got)) == sorted(whole)
    assert len(got) == max(len(whole), world)
    assert all(len(list(s)) == len(single) for s in shards)


def test_shards_cover_the_test_set_once():
    for n, world in [(10, 3), (7, 2), (3, 4)]:
        got = sum((list(ShardSampler(n, r, world)) for r in range(world)), [])
        assert got == list(range(n))


def test_global_batch_sampler_refuses_a_batch_that_does_not_split_over_the_processes():
    for batch, world in [(0, 1), (0, 2), (-2, 2), (6, 4), (3, 2)]:
        with pytest.raises(ValueError, match=rf"batch_size \({batch}\) must be a positive "
                                             r"multiple of the number of processes"):
            GlobalBatchSampler(10, batch, 0, world)
    assert len(GlobalBatchSampler(10, 8, 3, 4)) == 1


@pytest.mark.parametrize("n,batch,world", [(1, 2, 2), (3, 8, 4), (13, 6, 3), (12, 4, 2),
                                            (10, 4, 1), (5, 4, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_global_count_is_the_images_the_processes_get(n, batch, world, drop_last):
    """global_count(b), the denominator of the loss scale, is the number of images of global
    batch b over all processes: a short last batch's size, or the number of processes where
    that batch is cycled to one image each. The length rounds up exactly when the last batch
    is kept and short."""
    shards = [GlobalBatchSampler(n, batch, r, world, seed=1, drop_last=drop_last)
              for r in range(world)]
    per_rank = [list(s) for s in shards]
    want = n // batch if drop_last or n % batch == 0 else n // batch + 1
    assert len(shards[0]) == want and all(len(p) == want for p in per_rank)
    for b in range(want):
        assert shards[0].global_count(b) == sum(len(p[b]) for p in per_rank), b


def test_global_batch_sampler_order_follows_seed_epoch_start_and_shuffle():
    """set_epoch(epoch, start) resumes an epoch at batch start (the same batches as the
    epoch's from start on, the length still the epoch's); the shuffle depends on the seed as
    well as the epoch; shuffle=False keeps the order of the dataset."""
    n, batch = 40, 4
    s = GlobalBatchSampler(n, batch, 1, 2, seed=5)
    s.set_epoch(2)
    whole = list(s)
    s.set_epoch(2, start=3)
    assert list(s) == whole[3:] and len(s) == len(whole) == 10
    s.set_epoch(2)
    assert list(s) == whole
    other = GlobalBatchSampler(n, batch, 1, 2, seed=6)
    other.set_epoch(2)
    assert list(other) != whole
    plain = GlobalBatchSampler(n, batch, 1, 2, seed=5, shuffle=False)
    plain.set_epoch(2, start=1)
    assert list(plain) == [[i + 2, i + 3] for i in range(4, n, batch)]


# --- end to end ----------------------------------------------------------------------------

def test_cli_end_to_end_all_methods(tmp_path, capsys):
    rc, out, err = _run(TINY + ["--out", tmp_path], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["full", "linear", "bitfit", "bsr"]
    for name, r in methods.items():
        _assert_accuracy_counts_test_images(r["accuracy"], summary["img_size"])
        assert r["accuracy"] == r["history"][-1]["accuracy"], name
        for key in ("saved_activation_mib_per_image", "train_gflops_per_image", "step_time_s"):
            assert r[key] > 0, (name, key)
        assert len(r["history"]) == 1
        assert (tmp_path / name / "checkpoint.pt").is_file()
        assert (tmp_path / name / "delta.safetensors").is_file()
    full, bsr = methods["full"], methods["bsr"]
    for name, r in methods.items():   # the recorded rates, ratios and delta sizes
        assert r["lr"] == cli.DEMO_LR[name] and r["head_lr"] == pytest.approx(10 * r["lr"])
        assert r["step_time_vs_full"] == pytest.approx(r["step_time_s"] / full["step_time_s"])
        size = (tmp_path / name / "delta.safetensors").stat().st_size
        assert r["delta_mib"] == pytest.approx(size / 2**20), name
    assert (bsr["train_blocks"], bsr["drop_at"], bsr["keep_rate"]) == ([3, 7, 11], [3, 6, 9], 0.5)
    assert (bsr["memory_mode"], bsr["activation_dtype"]) == ("lean", "exact")
    assert bsr["saved_activation_mib_per_image"] < full["saved_activation_mib_per_image"] / 4
    assert bsr["train_gflops_per_image"] < full["train_gflops_per_image"] / 2
    assert full["step_time_vs_full"] == 1.0
    assert methods["linear"]["trainable_params"] < methods["bitfit"]["trainable_params"] \
        < bsr["trainable_params"] < full["trainable_params"]
    # tokens: 1 CLS + P patches, halved (plus the fused token) at blocks 3, 6, 9
    tokens = bsr["tokens_per_block"]
    assert tokens[0] == tokens[3] > tokens[4] == tokens[6] > tokens[7] == tokens[9] > tokens[10]
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for word in ("full fine-tuning", "linear probe", "BitFit", "BSR", "saved MiB/img"):
        assert word in out
    # The BSR delta (about 3/12 of the model) turns the base model into the fine-tuned one.
    from bsr_kernels.delta import read_delta
    _, cfg = read_delta(tmp_path / "bsr" / "delta.safetensors")
    assert 0.2 < cfg["numel"] / cfg["model_numel"] < 0.3
    base, _ = build_model(DIGITS_MODEL, 5)
    bsr_kernels.load_delta(base, tmp_path / "bsr" / "delta.safetensors")
    _, test = digits_split(DIGITS_TARGET_CLASSES, summary["img_size"])
    with torch.no_grad():
        correct = (base.eval()(test.images).argmax(-1) == test.labels).sum().item()
    assert correct == round(bsr["accuracy"] * len(test))     # the same images right


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (CI has none; the GPU run's tests part runs it)")
@pytest.mark.parametrize("memory_mode,compile_mode", [("auto", None), ("lean", None),
                                                      ("auto", "reduce-overhead"),
                                                      ("lean", "reduce-overhead")])
def test_cli_trains_bsr_on_cuda(memory_mode, compile_mode, tmp_path, capsys):
    """bsr-finetune on a GPU (``python -m benchmarks.bench_gpu --parts tests`` runs it): BSR on
    the demo under bf16 autocast (``--amp auto``), in autograd mode (``--memory-mode auto`` on
    CUDA) and lean, eagerly and compiled with CUDA graphs (``--torchcompile-mode
    reduce-overhead``, which the training loop must not break by holding a replay's outputs):
    it finishes, its training loss falls, its accuracy counts test images and is above chance
    (5 classes), and the summary names the mode it ran."""
    argv = ["--method", "bsr", "--device", "cuda", "--epochs", "4", "--batch-size", "64",
            "--timing-rounds", "1", "--profile-batch", "2", "--samples", "0", "--no-progress",
            "--memory-mode", memory_mode, "--out", tmp_path]
    if compile_mode is not None:
        argv += ["--torchcompile", "--torchcompile-mode", compile_mode]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"].startswith("cuda"), summary["device"]
    bsr = summary["methods"]["bsr"]
    assert bsr["memory_mode"] == ("autograd" if memory_mode == "auto" else memory_mode)
    _assert_accuracy_counts_test_images(bsr["accuracy"], summary["img_size"])
    history = bsr["history"]
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"], history
    assert bsr["accuracy"] > 0.3, history


def test_default_methods_and_epochs_follow_the_data(tmp_path, monkeypatch):
    """Without --method and --epochs (as the help says): the digits demo compares all four
    methods over 30 epochs; other data (here an image folder) trains BSR over 10."""
    seen = []

    def ran(args, info, log, warn, methods, *rest):
        seen.append((tuple(methods), args.epochs))
        return {}
    monkeypatch.setattr(cli, "_run", ran)
    assert cli.main([]) == 0
    assert cli.main(["--data", str(tmp_path / "pics"), "--method", "linear,bsr"]) == 0
    assert cli.main(["--data", str(tmp_path / "pics")]) == 0
    assert seen == [(("full", "linear", "bitfit", "bsr"), 30), (("linear", "bsr"), 10),
                    (("bsr",), 10)]


def test_cli_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bsr_kernels.finetune", "--method", "linear",
                        *TINY, "--timing-rounds", "0", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "linear probe" in r.stdout
    linear = json.loads((tmp_path / "summary.json").read_text())["methods"]["linear"]
    # --timing-rounds 0 skips the side-by-side timing: the table's step time is "-", not the
    # training loop's median step (its one step here is a warm-up, 10-25x a timed one)
    assert "step_time_s" not in linear and linear["median_step_time_s"] > 0, linear
    row = next(line for line in r.stdout.splitlines() if line.startswith("linear probe"))
    assert row.split()[-3:-1] == ["-", "-"], row   # step time, vs full


def _write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=20):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 120).to(torch.uint8)
            img[..., c] += 120
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")


def test_image_folder_and_checkpoint_start(tmp_path, capsys):
    _write_image_folder(tmp_path / "pics")
    # A local checkpoint of another head size (the 5-class digits model) starts the run.
    from safetensors.torch import load_file
    ckpt = tmp_path / "start.pt"
    torch.save({"state_dict": load_file(str(assets_dir() / f"{DIGITS_MODEL}.safetensors"))},
               ckpt)
    rc, out, err = _run(["--data", tmp_path / "pics", "--method", "bsr", "--epochs", "2",
                         "--batch-size", "4", "--checkpoint", ckpt, "--timing-rounds", "0",
                         "--profile-batch", "2", "--no-progress", "--out", tmp_path / "o"],
                        capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["num_classes"] == 2 and summary["weights"].startswith("checkpoint")
    assert len(summary["methods"]["bsr"]["history"]) == 2


# --- clear errors --------------------------------------------------------------------------

def test_error_missing_data_path(tmp_path, capsys):
    rc, _, err = _run(["--data", tmp_path / "nope", *TINY], capsys)
    assert rc == 2
    assert "--data" in err and "no such directory" in err


def test_error_unknown_model(capsys):
    rc, _, err = _run(["--model", "vit_not_a_real_model_xyz", *TINY], capsys)
    assert rc == 2
    assert "--model" in err and "unknown model" in err


def test_error_non_vit_model(capsys):
    rc, _, err = _run(["--model", "resnet18", *TINY], capsys)
    assert rc == 2
    assert "not a ViT" in err and "resnet18" in err


def test_error_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(["--data", tmp_path / "empty", *TINY], capsys)
    assert rc == 2 and "holds no images" in err
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "b").mkdir(parents=True)
    (tmp_path / "classes" / "a" / "notes.txt").write_text("not an image")
    rc, _, err = _run(["--data", tmp_path / "classes", *TINY], capsys)
    assert rc == 2 and "holds no images" in err


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "abc"])
def test_error_keep_rate(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--keep-rate", value, *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--keep-rate" in err and "(0, 1]" in err


def test_error_other_arguments(tmp_path, capsys):
    rc, _, err = _run(["--resume", *TINY], capsys)
    assert rc == 2 and "--resume needs --out" in err
    rc, _, err = _run(["--method", "full", "--train-blocks", "3,7", *TINY], capsys)
    assert rc == 2 and "--train-blocks" in err
    rc, _, err = _run(["--method", "bsr", "--train-blocks", "3,12", *TINY], capsys)
    assert rc == 2 and "--train-blocks index 12" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc, _, err = _run(["--checkpoint", bad, *TINY], capsys)
    assert rc == 2 and "--checkpoint" in err and "cannot read" in err
    for argv in (["--method", "sgd"], ["--epochs", "0"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, where", [
    (["--pretrained"], "--pretrained", "timm models"),
    (["--data-root", "elsewhere"], "--data-root", "cifar10"),
    (["--bad-images", "skip"], "--bad-images", "image folders")])
def test_options_that_would_do_nothing_here_are_refused(argv, flag, where, capsys):
    """With the digits model and data these did nothing, silently (--pretrained was even
    recorded as hub weights in the checkpoint's fingerprint)."""
    rc, _, err = _run([*argv, "--method", "linear", *TINY], capsys)
    assert rc == 2 and f"{flag}: applies to" in err and where in err, err


def test_a_folder_named_like_a_dataset_is_named_in_a_warning(tmp_path, monkeypatch):
    """--data digits with a ./digits folder here trains the built-in set: said, with the way to
    the folder; the name matches in any case, as the torchvision names do."""
    from bsr_kernels.finetune.data import build_data, data_kind
    assert [data_kind(d) for d in ("digits", "DIGITS", "Cifar10", "./digits", "pets/x")] == [
        "digits", "digits", "torchvision", "folder", "folder"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    said = []
    bundle = build_data("digits", 16, (0.5,) * 3, (0.5,) * 3, warn=said.append)
    assert bundle.name == "digits" and len(said) == 1 and "pass ./digits" in said[0]


def test_a_checkpoint_of_timms_train_script_is_read(tmp_path):
    """timm's train.py saves {"state_dict", "args": argparse.Namespace, ...}: a plain
    weights_only load refused it. Other pickled objects are still refused, and the message
    carries no terminal escape codes."""
    import argparse
    import datetime

    from bsr_kernels.finetune.models import read_state_dict
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn.qkv.weight": torch.randn(6, 2, generator=g),
          "head.bias": torch.randn(3, generator=g)}
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": sd, "version": 2,
                "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3)}, path)
    got = read_state_dict(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"state_dict": sd, "odd": datetime.date(2026, 11, 27)}, path)
    with pytest.raises(ValueError, match="cannot read it") as e:
        read_state_dict(path)
    assert "\x1b" not in str(e.value) and "datetime.date" in str(e.value)


def _small_vit(num_classes=5, seed=0, distilled=False, img_size=32):
    import timm
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return timm.create_model(name, img_size=img_size, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=num_classes)


def test_starting_weights_are_unwrapped_and_heads_of_another_size_skipped(tmp_path):
    """--checkpoint: the state dict under "model", "state_dict", "model_state" or "module",
    with or without DDP's ``module.`` prefix, loads the same weights; a head of another class
    count (both heads of a distilled DeiT) is skipped and stays as initialised; a position
    embedding of another grid is resampled and said."""
    from safetensors.torch import load_file, save_file

    sd = _small_vit(seed=1).state_dict()
    for wrap in ("model", "state_dict", "model_state", "module"):
        for prefix in ("", "module."):
            path = tmp_path / f"{wrap}-{prefix}pth"
            torch.save({wrap: {prefix + k: v for k, v in sd.items()}, "epoch": 1}, path)
            model = _small_vit(seed=2)
            assert load_weights(model, path) == []
            assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()), path
    assert load_weights(_small_vit(seed=2), path, report=True) == ([], [])   # nothing to say
    for distilled, heads in ((False, ["head"]), (True, ["head", "head_dist"])):
        path = tmp_path / f"ten-{distilled}.safetensors"
        save_file(_small_vit(10, seed=1, distilled=distilled).state_dict(), path)
        model = _small_vit(5, seed=2, distilled=distilled)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        skipped = sorted(f"{h}.{p}" for h in heads for p in ("bias", "weight"))
        assert sorted(load_weights(model, path)) == skipped
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in skipped)
        assert torch.equal(after["blocks.1.mlp.fc2.weight"],
                           load_file(str(path))["blocks.1.mlp.fc2.weight"])
    path = tmp_path / "64px.pth"
    torch.save(_small_vit(seed=1, img_size=64).state_dict(), path)
    _, notes = load_weights(_small_vit(seed=2), path, report=True)
    assert len(notes) == 1 and "resampled from 65 to 17 tokens to fit 32 px inputs" in notes[0]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("blocks.1.mlp.fc2.bias"), r"1 missing \(blocks\.1\.mlp\.fc2\.bias\)"),
    (lambda d: d.update({"blocks.1.extra": torch.ones(1)}), r"1 unexpected \(blocks\.1\.extra\)"),
    (lambda d: d.update({"blocks.1.mlp.fc2.bias": torch.ones(3)}),
     r"1 of another shape \(blocks\.1\.mlp\.fc2\.bias: \(3,\) vs model \(32,\)\)"),
    (lambda d: d.update({"blocks.1.mlp.fc2.bias": 1.0}), "holds no state dict of tensors"),
])
def test_starting_weights_that_do_not_fit_are_refused_before_loading(tmp_path, edit, match):
    sd = dict(_small_vit(seed=1).state_dict())
    edit(sd)
    path = tmp_path / "c.pth"
    torch.save(sd, path)
    model = _small_vit(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"--checkpoint {re.escape(str(path))}: .*{match}"):
        load_weights(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_error_offline_torchvision_download(monkeypatch, tmp_path, capsys):
    import urllib.error

    import torchvision.datasets as D

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D, "CIFAR10", offline)
    real, first = cli._main_first, []    # under torchrun the main process downloads first

    def main_first(info, fn, *a, **k):
        first.append(fn.__name__)
        return real(info, fn, *a, **k)
    monkeypatch.setattr(cli, "_main_first", main_first)
    rc, _, err = _run(["--data", "cifar10", "--data-root", tmp_path, *TINY], capsys)
    assert rc == 2
    assert "cifar10" in err and "could not download" in err and "ImageFolder" in err
    assert first == ["data_now"]


def test_error_offline_hub_weights(monkeypatch, capsys):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    rc, _, err = _run(["--model", "vit_tiny_patch16_224", "--pretrained", "--img-size", "32",
                       *TINY], capsys)
    assert rc == 2
    assert "--pretrained" in err and "hub weights" in err and "--checkpoint" in err


def test_a_model_that_cannot_build_is_not_called_a_download_failure(monkeypatch):
    """With --pretrained every error of timm.create_model was reported as "could not fetch the
    hub weights"; one that building the model without weights raises too is the model's."""
    import timm

    from bsr_kernels.finetune import models
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    monkeypatch.setattr(models, "_hub_offline", lambda: False)

    def broken(name, pretrained=False, **kwargs):   # an architecture timm cannot build
        raise AssertionError("dim should be divisible by num_heads")
    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ValueError, match="--model vit_tiny_patch16_224: cannot build it .*"
                                         "AssertionError: dim should be divisible") as e:
        models.build_model("vit_tiny_patch16_224", 3, img_size=32, pretrained=True)
    assert "hub weights" not in str(e.value)


def _local_dir(path, num_classes=10):
    """A folder as timm's ``save_for_hf`` writes it (config.json, model.safetensors) of a small
    random-init ViT; returns the model."""
    import timm
    from timm.models import save_for_hf

    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **arch)
    save_for_hf(model, path, model_config={"model_args": arch}, safe_serialization=True)
    return model


def test_local_dir_model_trains_from_its_folder(tmp_path, capsys):
    """``--model local-dir:PATH --pretrained`` (timm's source prefix, no network): the folder's
    architecture, input size and weights; the frozen blocks end as they were saved, the new
    5-class head replaces its 10-class one, and the summary names the folder."""
    saved = _local_dir(tmp_path / "vit")
    out = tmp_path / "o"
    rc, log, err = _run(["--model", f"local-dir:{tmp_path / 'vit'}", "--pretrained",
                         "--method", "bsr", *TINY, "--out", out], capsys)
    assert rc == 0, err
    assert f"local folder {tmp_path / 'vit'}" in log and "32 px" in log
    assert "its weights have a 10-class head" in err and "no --pretrained" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == f"local folder {tmp_path / 'vit'}" and summary["img_size"] == 32
    trained = torch.load(out / "bsr" / "checkpoint.pt", weights_only=True)["model"]
    start = saved.state_dict()
    frozen = [n for n in start if n.startswith("blocks.1.")]   # trained at depth 4: 0, 2, 3
    assert frozen and all(torch.equal(trained[n], start[n]) for n in frozen)
    assert trained["head.weight"].shape == (5, 48) and start["head.weight"].shape == (10, 48)


def test_source_prefixed_model_names_are_checked_before_anything_runs(tmp_path, capsys,
                                                                      monkeypatch):
    """A local-dir: folder without config.json, an unknown prefix, a hub repo or folder given
    without its prefix, and an hf-hub: repo offline: exit 2, naming --model, nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    for name, says in [(f"local-dir:{tmp_path / 'empty'}", "holds no config.json"),
                       ("foo:bar", "Unknown model source"),
                       ("timm/vit_tiny_patch16_224", "hf-hub:timm/vit_tiny_patch16_224"),
                       ("hf-hub:nobody/no_such_vit_xyz", "could not fetch its config.json")]:
        rc, _, err = _run(["--model", name, *TINY, "--out", tmp_path / "o"], capsys)
        assert rc == 2 and f"--model {name}" in err and says in err, (name, err)
        assert not (tmp_path / "o").exists()


def test_any_timm_vit_by_name(tmp_path, capsys):
    """A timm ViT name (random init here: no hub offline) at another input size."""
    rc, out, err = _run(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--method",
                         "bsr,full", *TINY, "--out", tmp_path], capsys)
    assert rc == 0, err
    assert "random init" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["img_size"] == 32
    bsr, full = summary["methods"]["bsr"], summary["methods"]["full"]
    # 4 patches: 2 kept + 1 fused at block 3; then 3 candidates: 2 kept + 1 fused, twice
    assert bsr["tokens_per_block"] == [5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4]
    assert bsr["train_gflops_per_image"] < full["train_gflops_per_image"]


def test_compressed_activations_flag(tmp_path, capsys):
    """--activation-dtype bfloat16: BSR stores its saved activations in bf16 (about half)."""
    rc, _, err = _run(["--method", "bsr", "--activation-dtype", "bfloat16", *TINY,
                       "--out", tmp_path / "bf16"], capsys)
    assert rc == 0, err
    rc, _, err = _run(["--method", "bsr", *TINY, "--out", tmp_path / "exact"], capsys)
    assert rc == 0, err
    bf16, exact = (json.loads((tmp_path / d / "summary.json").read_text())["methods"]["bsr"]
                   for d in ("bf16", "exact"))
    assert bf16["activation_dtype"] == "bfloat16" and exact["activation_dtype"] == "exact"
    ratio = bf16["saved_activation_mib_per_image"] / exact["saved_activation_mib_per_image"]
    assert 0.4 < ratio < 0.6
    img_size = json.loads((tmp_path / "bf16" / "summary.json").read_text())["img_size"]
    _assert_accuracy_counts_test_images(bf16["accuracy"], img_size)


# --- the methods registry and the distributed module ----------------------------------------

@pytest.mark.parametrize("sched", ["step", "multistep", "poly", "tanh"])
def test_timm_schedules_warm_up_to_the_full_rate_first(sched):
    """timm's warm-up climbs to its schedule's value at the warm-up's end: with --sched tanh
    and the warm-up as long as the run (--epochs 1, the default --warmup-epochs 1) that is 0,
    and every update ran at rate 0. The warm-up is now a linear prefix to the full rate (as
    the cosine schedule's), then the schedule runs from there; no update runs at rate 0."""
    from bsr_kernels.finetune.train import make_timm_scheduler
    w = torch.nn.Parameter(torch.randn(3))
    h = torch.nn.Parameter(torch.randn(2))

    def rates(total, warm):
        opt = torch.optim.SGD([{"params": [w], "lr": 0.01}, {"params": [h], "lr": 0.1}], lr=0.01)
        s = make_timm_scheduler(opt, sched, total, warm)
        out = []
        for _ in range(total):
            out.append([g["lr"] for g in opt.param_groups])
            s.step()
        return out, s, opt

    throughout, _, _ = rates(4, 4)
    assert throughout == [[pytest.approx(0.01 * t / 4), pytest.approx(0.1 * t / 4)]
                          for t in (1, 2, 3, 4)]
    lrs, s, opt = rates(12, 3)
    assert [r[0] for r in lrs[:3]] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])
    assert lrs[3] == pytest.approx([0.01, 0.1])            # the schedule starts at full rate
    assert all(r[0] > 0 for r in lrs) and lrs[-1][0] < 0.01
    assert all(a[0] >= b[0] for a, b in zip(lrs[3:], lrs[4:]))   # then only decays
    state = s.state_dict()                                  # resume: the same rate
    opt2 = torch.optim.SGD([{"params": [w], "lr": 0.01}, {"params": [h], "lr": 0.1}], lr=0.01)
    s2 = make_timm_scheduler(opt2, sched, 12, 3)
    s2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_extended_cosine_schedule_resumes_at_its_own_rate():
    """A cosine schedule loaded into a longer one (--resume with more --epochs) takes its next
    step at the longer schedule's rate for that step, not the saved run's last rate (0 at the
    end of a cosine); loaded into the same schedule, the rate is the saved one."""
    from bsr_kernels.finetune.train import make_scheduler
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, 18, 4)
    for _ in range(18):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    for total in (36, 18):
        opt2 = torch.optim.AdamW([p], lr=1.0)
        sched2 = make_scheduler(opt2, total, 4)
        opt2.load_state_dict(saved_opt)
        sched2.load_state_dict(saved_sched)
        want = sched2.lr_lambdas[0](18)
        assert opt2.param_groups[0]["lr"] == want and sched2.get_last_lr() == [want]
        if total == 36:
            assert want > 0.5
        else:
            assert want == opt.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("sched, warm", [("step", 0), ("multistep", 0), ("poly", 3),
                                         ("tanh", 3)])
def test_timm_schedules_count_their_epochs_in_updates(sched, warm):
    """With several updates an epoch (2 here; 6 epochs, 12 updates, after ``warm``): step
    decays 10x every E // 3 = 2 epochs, multistep 10x after E // 2 = 3 and again after
    3E // 4 = 4 epochs (it decayed one update early: timm decays at update m - 1 for a
    milestone m), poly and tanh reach 0 after the run's last update."""
    from bsr_kernels.finetune.train import make_timm_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    s = make_timm_scheduler(opt, sched, 12 + warm, warm, steps_per_epoch=2)
    lrs = []
    for _ in range(12 + warm):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    after = lrs[warm:]   # the schedule's 12 updates
    if sched == "step":
        assert after == pytest.approx([0.1 ** (t // 4) for t in range(12)])
    elif sched == "multistep":
        assert after == pytest.approx([1.0] * 6 + [0.1] * 2 + [0.01] * 4)
        one = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        make_timm_scheduler(one, sched, 1, 0)     # 1 epoch of 1 update: nothing to decay yet
        assert one.param_groups[0]["lr"] == 1.0   # (it ran at 0.01: both milestones at 1)
    else:
        assert after[0] == pytest.approx(1.0, abs=1e-5) and lrs[warm - 1] == 1.0
        assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_train_step_takes_one_step_along_the_batch_loss_at_the_schedules_rate():
    """train_step returns the batch's cross-entropy before the step, steps the weights against
    its gradient at the schedule's current rate (the warm-up's first: lr / warm-up, not 0),
    then advances the schedule; the gradient is the batch's alone (the last one cleared)."""
    from bsr_kernels.finetune.train import make_scheduler, train_step
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = make_scheduler(opt, total_steps=8, warmup_steps=4)
    for rate in (0.5 / 4, 0.5 * 2 / 4):
        before = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert train_step(model, x, y, opt, sched, amp="off") == pytest.approx(loss.item())
        for p, b, g in zip(model.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), b - rate * g)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 3 / 4)


def test_evaluate_is_the_eval_mode_accuracy_and_mean_loss_over_every_image():
    """evaluate: accuracy and mean cross-entropy per image over the whole test set, batches of
    unequal size included, with the model in eval mode (no dropout), whatever mode it was in."""
    from torch.utils.data import DataLoader, TensorDataset

    from bsr_kernels.finetune.distributed import DistInfo
    from bsr_kernels.finetune.train import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    with torch.no_grad():
        logits = model[0](x)
    want_acc = (logits.argmax(-1) == y).float().mean().item()
    assert 0 < want_acc < 1
    want_loss = torch.nn.functional.cross_entropy(logits, y).item()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)   # batches of 3, 3 and 1
    acc, loss = evaluate(model, loader, DistInfo(), amp="off")
    assert acc == pytest.approx(want_acc) and loss == pytest.approx(want_loss)
    assert not model.training


def test_time_steps_times_the_rounds_after_warm_up_and_leaves_the_weights(monkeypatch):
    """time_steps: each model's median over the timed rounds only (the warm-up rounds, slow
    here, are not counted); its steps run at rate 0, so the weights are unchanged afterwards,
    and no gradients are left behind."""
    from bsr_kernels.finetune import train
    torch.manual_seed(0)
    models = {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)}
    before = {k: {n: p.detach().clone() for n, p in m.named_parameters()}
              for k, m in models.items()}
    clock, calls = [0.0], []
    real_step = train.train_step

    def step(model, *args, **kwargs):   # warm-up steps take 10 s on the fake clock, then 1 s
        calls.append(model)
        clock[0] += 10.0 if len(calls) <= 3 * len(models) else 1.0
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    times = train.time_steps(models, x, y, rounds=2, warmup=3, amp="off")
    assert times == {"a": 1.0, "b": 1.0} and len(calls) == 10
    for k, m in models.items():
        for n, p in m.named_parameters():
            assert torch.equal(p, before[k][n]) and p.grad is None, (k, n)


def test_optimizer_groups_scale_the_heads_rate_and_decay_only_weight_matrices():
    """make_optimizer: every trainable parameter in one group, frozen ones in none; both heads
    of a distilled DeiT at lr * head_lr_scale, the rest at lr; weight decay on weight matrices
    and kernels only, not on biases, norms, the position embedding or the tokens; a model with
    nothing to train is refused."""
    from bsr_kernels.finetune import train
    model = _small_vit(distilled=True)
    model.blocks[0].requires_grad_(False)
    opt = train.make_optimizer(model, lr=1e-3, head_lr_scale=10.0, weight_decay=0.05)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(group)
    assert {n for n, p in named.items() if id(p) in group} == {
        n for n, p in named.items() if p.requires_grad} and "blocks.0.attn.qkv.weight" in named
    decayed = {"patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
               "head.weight", "head_dist.weight"}
    for n in [*decayed, "cls_token", "dist_token", "pos_embed", "blocks.1.norm1.weight",
              "blocks.1.attn.qkv.bias", "norm.bias", "head.bias", "head_dist.bias"]:
        g = group[id(named[n])]
        assert g["weight_decay"] == (0.05 if n in decayed else 0.0), n
        assert g["lr"] == pytest.approx(1e-2 if n.startswith("head") else 1e-3), n
    assert train.check_optimizer_name("AdamW") == "adamw"
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.make_optimizer(model.requires_grad_(False), lr=1e-3)


def test_seed_all_repeats_the_draws_of_every_generator():
    """seed_all seeds torch, Python's ``random`` (timm's augmentations draw from it) and NumPy:
    the same seed repeats each generator's draws, another seed changes them."""
    import random

    import numpy as np

    from bsr_kernels.finetune.train import seed_all

    def draws(seed):
        seed_all(seed)
        return torch.rand(2).tolist(), random.random(), np.random.rand()

    first = draws(3)
    assert draws(3) == first
    assert all(a != b for a, b in zip(draws(4), first))


def _fit(monkeypatch, fail_at=None, **options):
    """``fit`` of a 3-class linear model on 12 training and 5 test feature vectors (batches of
    4: 3 steps an epoch), lr 0.1, half an epoch of warm-up, then ``options``. Returns the
    model, fit's result and the backbone rate of each step; ``fail_at``: the step (from 1)
    that raises instead."""
    from torch.utils.data import TensorDataset

    from bsr_kernels.finetune import train
    from bsr_kernels.finetune.data import DataBundle
    from bsr_kernels.finetune.distributed import DistInfo
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(17, 4, generator=g), torch.arange(17) % 3
    data = DataBundle("feats", TensorDataset(x[:12], y[:12]), TensorDataset(x[12:], y[12:]), 3,
                      ["a", "b", "c"], (0,), (1,))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    real = getattr(train.train_step, "unpatched", train.train_step)   # not an earlier step()
    rates = []

    def step(net, images, labels, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        if len(rates) == fail_at:
            raise RuntimeError("the machine went away")
        return real(net, images, labels, optimizer, *args, **kwargs)
    step.unpatched = real
    monkeypatch.setattr(train, "train_step", step)
    opts = train.FitOptions(**{"batch_size": 4, "lr": 0.1, "warmup_epochs": 0.5, **options})
    return model, train.fit(model, data, opts, DistInfo(), log=lambda s: None), rates


def test_fit_resumed_inside_an_epoch_ends_as_the_run_it_continues(tmp_path, monkeypatch):
    """A run stopped by an error inside epoch 2 (its checkpoint saved every step) and resumed
    ends as the run trained without a break: the same weights, history (each epoch's mean
    training loss, the interrupted one's too) and step count; it says where it resumed.
    ``on_epoch`` sees the history after each epoch, epochs numbered from 1."""
    seen = []
    whole, want, _ = _fit(monkeypatch, epochs=2, on_epoch=lambda h: seen.append(list(h)))
    assert [h["epoch"] for h in want["history"]] == [1, 2]
    assert seen == [want["history"][:1], want["history"]]     # after each epoch
    every = dict(epochs=2, checkpoint=tmp_path / "c.pt", save_every_steps=1)
    with pytest.raises(RuntimeError, match="went away"):
        _fit(monkeypatch, fail_at=5, **every)   # after epoch 1's 3 steps and 1 of epoch 2
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial_epoch"]["batches"] == 1, saved["epoch"]
    model, got, _ = _fit(monkeypatch, resume=True, **every)
    assert got["resumed_from_epoch"] == 1 and want["resumed_from_epoch"] == 0
    assert got["steps"] == want["steps"] == 6
    assert got["history"] == want["history"] and len(want["history"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole.parameters()))


def test_fit_warms_up_then_decays_and_a_longer_resumed_run_takes_its_own_rates(tmp_path,
                                                                             monkeypatch):
    """The rate of each step: half an epoch of warm-up (1.5 steps, rounded to 2) climbs to lr,
    then the cosine decays from lr; a 1-epoch run resumed with --epochs 2 trains its second
    epoch at the 2-epoch schedule's rates (not from the 1-epoch cosine's end, 0); without
    resume, a checkpoint left in its place is not read."""
    _, _, rates = _fit(monkeypatch, epochs=2)
    assert rates[:3] == pytest.approx([0.05, 0.1, 0.1]) and len(rates) == 6
    assert all(a > b > 0 for a, b in zip(rates[2:], rates[3:])), rates
    _fit(monkeypatch, epochs=1, checkpoint=tmp_path / "c.pt")
    _, res, again = _fit(monkeypatch, epochs=1, checkpoint=tmp_path / "c.pt")
    assert res["resumed_from_epoch"] == 0 and len(again) == 3   # no resume: trained again
    _, res, resumed = _fit(monkeypatch, epochs=2, checkpoint=tmp_path / "c.pt", resume=True)
    assert res["resumed_from_epoch"] == 1 and resumed == pytest.approx(rates[3:])


def test_adapt_uses_the_methods_registry():
    """bsr-finetune's methods are bsr_kernels.methods' (less the eager baseline): the same
    trained parameters, and adapt refuses eager_bsr and block settings outside BSR."""
    from timm.models.vision_transformer import VisionTransformer

    from bsr_kernels import methods
    from bsr_kernels.finetune import distributed, train

    def vit():
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2,
                                 num_classes=3)

    assert train.METHODS == ("full", "linear", "bitfit", "bsr")
    assert set(train.METHODS) < set(methods.METHODS)
    for name in train.METHODS:
        a = train.adapt(vit(), name)
        b = methods.setup(vit(), name).module
        assert set(train.trainable_parameters(a)) == set(methods.trainable_parameters(b))
    names = set(methods.trainable_parameters(methods.setup(vit(), "bitfit").model))
    assert names == {n for n, _ in vit().named_parameters()
                     if n.endswith(".bias") or n.startswith("head.")}
    assert set(methods.trainable_parameters(methods.setup(vit(), "linear").model)) \
        == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="--method"):
        train.adapt(vit(), "eager_bsr")
    # bsr-finetune's --train-blocks and --drop-at set up BSR and leave the other methods be
    args = cli.build_parser().parse_args(["--train-blocks", "1,2", "--drop-at", "2"])
    args.memory_mode_used = "lean"
    base = vit()
    bsr = cli._adapt(base, "bsr", args).bsr_config
    assert (bsr.train_blocks, bsr.drop_at) == ((1, 2), (2,)) and not hasattr(base, "bsr_config")
    for name in ("full", "linear", "bitfit"):
        assert not hasattr(cli._adapt(base, name, args), "bsr_config"), name
    with pytest.raises(ValueError, match="--train-blocks"):
        methods.setup(vit(), "bitfit", train_blocks=(1,))
    # the process group and the samplers live in one module; the old names still import
    assert train.setup_distributed is distributed.setup_distributed
    assert GlobalBatchSampler is distributed.GlobalBatchSampler
    assert ShardSampler is distributed.ShardSampler
