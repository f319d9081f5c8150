"""``bsr-finetune --multitask`` has the single-task mode's protections: a used --out is refused
without --resume or --overwrite, one process writes it (``.lock``), --out is checked before
anything loads, a NaN/inf loss stops the run (exit 3) before a checkpoint of it is written, flags
are checked naming them, Ctrl-C and I/O errors end without a traceback, --help is complete."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsr_kernels import checkpoint
from bsr_kernels.finetune import cli, models
from bsr_kernels.finetune import multitask as mt

#: The smallest run: one cheap method, one epoch of one batch per task, nothing timed.
FAST = ["--method", "linear", "--epochs", "1", "--batch-size", "16", "--max-train-images", "16",
        "--timing-rounds", "0", "--profile-batch", "2"]
#: The smallest MoE (methods moe_full and bsr_moe; others refuse these options).
SMALL_MOE = ["--experts", "2", "--top-k", "1"]
TWO = ["--method", "linear,bsr_dense", *FAST[2:]]   # bsr_dense: a folder cli.py does not know


def _run(argv, capsys):
    rc = mt.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_loading(monkeypatch):
    """Fails the test if data or weights are loaded."""
    def boom(*a, **k):
        raise AssertionError("data or weights were loaded before the arguments were checked")
    monkeypatch.setattr(mt, "digits_tasks", boom)
    monkeypatch.setattr(mt, "data_tasks", boom)
    monkeypatch.setattr(models, "build_model", boom)


def _files(folder):
    """The bytes of every file of a run but args.json (rewritten by each start) and .lock."""
    return {p: p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name not in ("args.json", ".lock")}


# --- a used --out --------------------------------------------------------------------------

def test_used_out_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    """The same command twice: the second is refused (exit 2) and the first run's files keep
    their bytes; also when only a checkpoint of a multitask method is there (a run killed in
    its first method's training), which bsr-finetune's own file list does not cover."""
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 0, err
    before = _files(tmp_path)
    assert tmp_path / "bsr_dense" / "checkpoint.pt" in before
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 2
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _files(tmp_path) == before
    for p in before:
        if p.name != "checkpoint.pt" or p.parent.name != "bsr_dense":
            p.unlink()
    (tmp_path / "linear").rmdir()
    ckpt = tmp_path / "bsr_dense" / "checkpoint.pt"
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 2 and "bsr_dense/checkpoint.pt" in err, err
    assert ckpt.read_bytes() == before[ckpt]
    assert not (tmp_path / ".lock").exists()


def test_overwrite_replaces_the_run_and_args_json_records_it(tmp_path, capsys):
    """--overwrite deletes the earlier run (also the folder of a method the new run does not
    train) and trains afresh; args.json holds the new command line; the lock is released."""
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 0, err
    argv = [*FAST, "--seed", "1", "--out", str(tmp_path), "--overwrite"]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert "--overwrite: deleted the earlier run" in err
    assert not (tmp_path / "bsr_dense").exists()
    state = torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)
    assert state["fingerprint"]["seed"] == 1
    record = checkpoint.read_json(tmp_path / "args.json", "args", "-", format=cli.ARGS_FORMAT,
                                  versions=(1,))
    assert record["argv"] == ["--multitask", *argv] and record["args"]["overwrite"] is True
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("refusal", ["missing task data", "second method's set-up"])
def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(refusal, tmp_path, capsys,
                                                                  monkeypatch):
    """--overwrite with a mistake found only once loading starts (task data that does not
    exist) or once the methods are set up (here the second method's build refused): exit 2
    and the old run is still there, byte for byte."""
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 0, err
    before = _files(tmp_path)
    argv = [*TWO, "--out", tmp_path, "--overwrite"]
    if refusal == "missing task data":
        argv += ["--task", f"x={tmp_path / 'no_such_dir'}"]
        expected = "no_such_dir"
    else:
        real = mt.build_method

        def refuse_bsr_dense(base, method, *a, **k):
            if method == "bsr_dense":
                raise ValueError("blocks: refused for this test")
            return real(base, method, *a, **k)
        monkeypatch.setattr(mt, "build_method", refuse_bsr_dense)
        expected = "refused for this test"
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and expected in err and "deleted" not in err, err
    assert _files(tmp_path) == before
    assert not (tmp_path / ".lock").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, capsys,
                                                                    monkeypatch):
    """--batch-size 16 with 3 processes (torchrun, as setup_distributed would report it) is
    refused naming both numbers, before anything is loaded or written."""
    from bsr_kernels.finetune import train
    from bsr_kernels.finetune.distributed import DistInfo
    _no_loading(monkeypatch)
    monkeypatch.setattr(train, "setup_distributed", lambda device: DistInfo(0, 3))
    rc, _, err = _run([*FAST, "--out", tmp_path / "run"], capsys)
    assert rc == 2, err
    assert "--batch-size 16 must be a multiple of the number of processes (3)" in err, err
    assert not (tmp_path / "run").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    rc, _, err = _run([*FAST, "--out", tmp_path, "--resume", "--overwrite"], capsys)
    assert rc == 2 and "--resume and --overwrite exclude each other" in err, err


@pytest.mark.parametrize("extra,message", [
    (["--keep-rate", "0.3"], "--keep-rate: applies to --method bsr_moe or bsr_dense"),
    (["--memory-mode", "fast"], "--memory-mode: applies to --method bsr_moe or bsr_dense"),
    (["--method", "bsr_dense", "--experts", "4", "--top-k", "2"],
     "--experts, --top-k: apply to --method moe_full or bsr_moe"),
    # fewer experts than the default --top-k: still named as unused, not as too few for top-k
    (["--method", "bsr_dense", "--experts", "2"],
     "--experts: applies to --method moe_full or bsr_moe"),
    (["--method", "bsr_moe", "--experts", "2"], "--top-k (4) must not exceed --experts (2)"),
    (["--overwrite"], "--overwrite: applies to a run written with --out DIR"),
    (["--data-root", "."], "--data-root: applies to --task NAME=DATA with a torchvision set"),
    (["--pretrained", "--checkpoint", "w.pt"], "--pretrained and --checkpoint both choose"),
    (["--pretrained"], "--pretrained: applies to timm models"),
    (["--img-size", "18"], "--img-size 18: not a whole number of bsr_digits_vit's 4x4 px")])
def test_options_that_would_do_nothing_are_refused_as_in_bsr_finetune(extra, message, capsys,
                                                                      monkeypatch):
    """An option that none of the chosen methods or tasks uses, or one bsr-finetune refuses
    (two sources of weights, an image size that cuts patches), exits 2 naming it before any data
    or weights load; before, --multitask ignored it (an 18 px image lost its last 2 px rows and
    columns, --overwrite without --out did nothing) or named another one (--experts 2 without an
    MoE method was refused as fewer experts than --top-k, which was not given)."""
    _no_loading(monkeypatch)
    rc, _, err = _run([*FAST, *extra], capsys)
    assert rc == 2 and message in err, err


def test_resume_refuses_a_run_of_the_other_mode_and_leaves_it_as_it_was(tmp_path, capsys):
    """--multitask --resume on a bsr-finetune run crashed (TypeError) after replacing its
    args.json with its own options, so the run's own --resume then took those; now both ways
    exit 2 naming --resume and the mode, the folder's bytes unchanged. The command the message
    gives works (multitask's --resume took no PATH: the advice failed as "unrecognized
    arguments")."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert cli.main(["--method", "linear", "--epochs", "1", "--batch-size", "128",
                     "--timing-rounds", "0", "--profile-batch", "2", "--samples", "0",
                     "--out", str(single)]) == 0
    rc, _, err = _run([*FAST, "--out", multi], capsys)
    assert rc == 0, err
    for folder, argv, kind in ((single, ["--multitask"], "a single-task run; leave out"),
                               (multi, [], "a --multitask run; add")):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        capsys.readouterr()
        rc = cli.main([*argv, "--resume", "--out", str(folder), "--epochs", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and f"--resume {folder}: the run there is {kind} --multitask" in err, err
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
        advice = err.split("(bsr-finetune ")[1].split(")")[0].split()
        assert advice == [*(["--multitask"] if folder == multi else []), "--resume", str(folder)]
        rc = cli.main(advice)
        err = capsys.readouterr().err
        assert rc == 0, err
    # a checkpoint in a folder only the multitask mode has (bsr_dense) is that run's too
    (multi / "bsr_dense").mkdir()
    (multi / "bsr_dense" / "checkpoint.pt").write_bytes(
        (multi / "linear" / "checkpoint.pt").read_bytes())
    rc = cli.main(["--resume", str(multi / "bsr_dense" / "checkpoint.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--resume {multi}: the run there is a --multitask run; add" in err, err


def test_a_defect_before_any_file_is_written_leaves_the_run_as_it_was(tmp_path, capsys,
                                                                       monkeypatch):
    """Not only a usage error: any failure before the run writes a file (here a TypeError, as
    the one above was) puts the earlier args.json back, so the folder's own --resume works."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    before = (tmp_path / "args.json").read_bytes()

    def broken(*a, **k):
        raise TypeError("a defect, for this test")
    monkeypatch.setattr(mt, "digits_tasks", broken)
    with pytest.raises(TypeError, match="for this test"):
        mt.main([*FAST, "--epochs", "2", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "args.json").read_bytes() == before
    assert not (tmp_path / ".lock").exists()


# --- --resume -------------------------------------------------------------------------------

def _weights(folder, method="linear"):
    return torch.load(Path(folder) / method / "checkpoint.pt", weights_only=True)["model"]


def test_resume_with_more_epochs_continues_the_run(tmp_path, capsys):
    """The reviewer's case: a 1-epoch run resumed with --epochs 2 was warned that the schedule
    now follows 2 epochs, then refused (the checkpoint's "epochs: checkpoint 1, now 2"). It
    trains epoch 2; the warm-up being one epoch either way, it ends as a 2-epoch run from the
    start does. Fewer --epochs than the checkpoint has trained is refused, the checkpoint kept."""
    args = [*FAST, "--max-train-images", "32"]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    rc, _, err = _run([*args, "--out", cut], capsys)
    assert rc == 0, err
    rc, out, err = _run(["--resume", "--out", cut, "--epochs", "2"], capsys)
    assert rc == 0, err
    assert "schedule now follows 2" in err and "resumed from" in out and "epoch 2/2" in out
    rc, _, err = _run([*args, "--epochs", "2", "--out", whole], capsys)
    assert rc == 0, err
    runs = [json.loads((d / "summary.json").read_text())["methods"]["linear"]
            for d in (cut, whole)]
    assert runs[0]["resumed_from_epoch"] == 1 and len(runs[0]["history"]) == 2
    assert runs[0]["history"] == runs[1]["history"]
    for name, w in _weights(whole).items():
        torch.testing.assert_close(_weights(cut)[name], w, rtol=0, atol=0, msg=name)
    before = (cut / "linear" / "checkpoint.pt").read_bytes()
    rc, _, err = _run(["--resume", "--out", cut, "--epochs", "1"], capsys)
    assert rc == 2 and "already trained 2 epochs, more than --epochs 1" in err, err
    assert "--epochs 2 or more" in err
    assert (cut / "linear" / "checkpoint.pt").read_bytes() == before


def test_resume_of_a_run_without_args_json_finds_the_multitask_method_folders(tmp_path,
                                                                              capsys):
    """A run whose args.json is gone (deleted by hand) is still found by its method folders,
    the multitask mode's own (bsr_dense, which bsr-finetune does not have): --resume with the
    options given again continues it, not "no run to resume"."""
    dense = ["--method", "bsr_dense", *FAST[2:]]
    rc, _, err = _run([*dense, "--out", tmp_path], capsys)
    assert rc == 0, err
    (tmp_path / "args.json").unlink()
    rc, out, err = _run([*dense, "--epochs", "2", "--resume", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert "bsr_dense: resumed from" in out and "after epoch 1" in out, out
    state = torch.load(tmp_path / "bsr_dense" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_resume_without_the_checkpoint_of_a_finished_method_is_refused(tmp_path, capsys,
                                                                         monkeypatch):
    """As in bsr-finetune: --resume of a run whose finished method lost its checkpoint.pt
    (deleted to save space, the delta kept) exits 2 naming the file and the ways on, before
    anything loads and with the folder unchanged; before, --multitask trained the method again
    from epoch 0 and replaced its delta."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "linear" / "checkpoint.pt"
    ckpt.unlink()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _no_loading(monkeypatch)
    rc, out, err = _run(["--resume", "--out", tmp_path], capsys)
    assert rc == 2, err
    assert "checkpoint error: --resume: linear finished in an earlier run" in err, err
    assert f"its checkpoint {ckpt} is missing" in err and "delta.safetensors" in err, err
    assert "linear epoch" not in out, out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_with_fewer_methods_says_what_the_summary_leaves_out(tmp_path, capsys):
    """As in bsr-finetune: --resume with a --method list that leaves out methods of the run
    warns, naming them and the list that keeps them in; their files stay. Before, summary.json
    and report.png silently lost the others."""
    rc, _, err = _run([*TWO, "--out", tmp_path], capsys)
    assert rc == 0, err
    kept = _files(tmp_path / "bsr_dense")
    rc, _, err = _run(["--resume", "--out", tmp_path, "--method", "linear"], capsys)
    assert rc == 0, err
    assert (f"--method linear: the run in {tmp_path} also holds bsr_dense, which this run's "
            "summary and report leave out" in err
            and "--method linear,bsr_dense keeps them in" in err), err
    assert _files(tmp_path / "bsr_dense") == kept
    rc, _, err = _run(["--resume", "--out", tmp_path, "--method", "linear,bsr_dense"], capsys)
    assert rc == 0 and "also holds" not in err, err


@pytest.mark.parametrize("flag", ["--mu", "--multi", "--multitas", "--multitask"])
def test_an_abbreviation_of_multitask_runs_the_multitask_demo(flag, monkeypatch):
    """argparse takes any unambiguous prefix of a long option, so bsr-finetune's parser read
    ``--multi`` as --multitask, but the dispatch matched the whole word only: the single-task
    run started (or failed on a multitask option). Every prefix argparse reads as --multitask
    now runs the multitask demo, without it in its arguments; an ambiguous one (``--m``: also
    --model, --method, --memory-mode) is still argparse's error."""
    seen = []

    def multitask_main(argv):
        seen.append(argv)
        return 0
    monkeypatch.setattr(mt, "main", multitask_main)
    assert cli.main([flag, *FAST, "--experts", "2"]) == 0
    assert seen == [[*FAST, "--experts", "2"]]
    with pytest.raises(SystemExit):
        cli.main(["--m", *FAST])
    assert len(seen) == 1


# --- --max-train-images ----------------------------------------------------------------------

def _image_folder(root, classes=("cat", "dog", "fox"), per_class=10):
    """An ImageFolder of ``per_class`` 8 x 8 noise images per class (a fifth held out)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_max_train_images_of_an_image_folder_is_a_seeded_draw_of_every_class(tmp_path, capsys,
                                                                              monkeypatch):
    """An ImageFolder lists its images class by class, and --max-train-images 8 took the first
    8: all cats. The 8 are drawn at random with --seed: of several classes, the same ones on
    --resume, others with another --seed; the checkpoint records the draw, so a checkpoint
    without it (a run on the first N) is not resumed on other images."""
    folder = _image_folder(tmp_path / "imgs")
    drawn, real = [], mt.train

    def record(model, tasks, *a, **k):
        ds = tasks[0].train
        drawn.append((list(ds.indices), [ds[i][1] for i in range(len(ds))]))
        return real(model, tasks, *a, **k)
    monkeypatch.setattr(mt, "train", record)
    argv = [*FAST, "--max-train-images", "8", "--task", f"a={folder}"]
    out = tmp_path / "run"
    for extra in (["--out", out], ["--out", out, "--resume"], ["--seed", "1"]):
        rc, _, err = _run([*argv, *extra], capsys)
        assert rc == 0, err
    (first, labels), (resumed, _), (other, _) = drawn
    assert len(first) == 8 and len(set(labels)) == 3, labels     # cats, dogs and foxes
    assert resumed == first and other != first
    ckpt = out / "linear" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["fingerprint"]["train_subsets"] == {"a": "random 8 of 24, seed 0"}
    del state["fingerprint"]["train_subsets"]
    torch.save(state, ckpt)
    rc, _, err = _run([*argv, "--out", out, "--resume"], capsys)
    assert rc == 2 and "train_subsets: checkpoint None" in err, err


# --- torchrun -------------------------------------------------------------------------------

def test_torchrun_with_fewer_training_images_than_processes(tmp_path, capsys):
    """The reviewer's case: --max-train-images 1 under 2 processes left process 1 no image of
    the batch (torch.stack of nothing) and the run hung. The short batch is cycled to one image
    per process, so the run completes and, DDP averaging two gradients of the same image,
    trains the weights one process trains on that image."""
    argv = [*FAST, "--device", "cpu", "--batch-size", "2", "--max-train-images", "1"]
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "torchrun.log"     # not a pipe: a hung worker would hold it open
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "2", "-m", "bsr_kernels.finetune",
                                 "--multitask", *argv, "--out", str(tmp_path / "ddp")],
                                cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()     # torchrun stops its workers (their own sessions), SIGKILL if need be
        proc.wait(timeout=60)
        pytest.fail("the 2-process run hung:\n" + log.read_text()[-3000:])
    assert proc.returncode == 0, log.read_text()[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    rc, _, err = _run([*argv, "--out", tmp_path / "one"], capsys)
    assert rc == 0, err
    one = _weights(tmp_path / "one")
    for name, w in _weights(tmp_path / "ddp").items():
        torch.testing.assert_close(w, one[name], rtol=1e-5, atol=1e-6, msg=name)


# --- --out checked first (the lock is bsr-finetune's own claim: test_finetune_reliability)

def test_out_that_is_a_file_fails_before_loading(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run([*FAST, "--out", f], capsys)
    assert rc == 2 and f"--out {f}" in err and "is a file" in err, err
    assert f.read_text() == "x"


def test_an_unwritable_method_folder_is_a_clear_error_naming_it(tmp_path, capsys):
    """An OSError during the run (the method's folder is a file, so its checkpoint cannot be
    written) ends with exit 2 and a message naming the path, not a traceback; the lock is
    released."""
    (tmp_path / "linear").write_text("not a folder")
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 2 and f"error: {tmp_path / 'linear'}" in err, err
    assert "Traceback" not in err and not (tmp_path / ".lock").exists()


# --- divergence, interruption ---------------------------------------------------------------

def test_non_finite_loss_stops_with_exit_3_and_saves_nothing(tmp_path, capsys):
    """The reviewer's case (--lr 1e8): the loss becomes NaN in epoch 1; the run stops there
    with exit 3 naming --lr, and writes no checkpoint, delta or summary."""
    rc, _, err = _run(["--method", "bsr_dense", "--lr", "1e8", *FAST[2:], "--max-train-images",
                       "32", "--out", tmp_path], capsys)
    assert rc == cli.EXIT_DIVERGED == 3, err
    assert "training diverged" in err and ("nan" in err or "inf" in err) and "--lr" in err
    assert not (tmp_path / "bsr_dense" / "checkpoint.pt").exists()
    assert not (tmp_path / "bsr_dense" / "delta.safetensors").exists()
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / ".lock").exists()


def test_an_optimizer_step_that_overflows_float32_is_a_divergence(tmp_path, capsys):
    """--lr 1e38: AdamW's first step size overflows float32; the multitask run stops as
    diverged (exit 3, naming the step and --lr), as a single-task run does, not with a
    traceback."""
    rc, _, err = _run([*FAST, "--lr", "1e38", "--out", tmp_path], capsys)
    assert rc == cli.EXIT_DIVERGED, err
    assert "training diverged" in err and "overflowed float32 at step 1" in err, err
    assert "--lr" in err and "Traceback" not in err
    assert not (tmp_path / "linear" / "delta.safetensors").exists()


def test_non_finite_loss_in_epoch_2_keeps_the_finite_epoch_1_checkpoint(tmp_path, capsys,
                                                                        monkeypatch):
    """The loss turns NaN in epoch 2 (the loss function made to return NaN from the first step
    of epoch 2 on): exit 3, and the checkpoint on disk is epoch 1's, every tensor finite."""
    real, calls = torch.nn.functional.cross_entropy, []
    steps_per_epoch = 3 * 2        # 3 tasks x 2 batches of 16 of the 32 training images

    def nan_from_epoch_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > steps_per_epoch else loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from_epoch_2)
    rc, _, err = _run(["--method", "bsr_dense", *FAST[2:], "--epochs", "2",
                       "--max-train-images", "32", "--out", tmp_path], capsys)
    assert rc == 3 and "epoch 2" in err, err
    assert len(calls) == steps_per_epoch + 1       # stopped at the first NaN step
    state = torch.load(tmp_path / "bsr_dense" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt mid-run: exit 130, a hint to --resume, no traceback, lock released."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(mt, "evaluate", interrupt)
    try:
        rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    except KeyboardInterrupt:   # escaping main, it would also stop pytest itself
        pytest.fail("KeyboardInterrupt escaped main()")
    assert rc == 130 and "interrupted" in err and "--resume" in err, err
    assert "Traceback" not in err and not (tmp_path / ".lock").exists()


def test_expert_usage_counts_each_tasks_test_images_then_stops_counting():
    """expert_usage: per MoE block, each task's routed fractions over its test images (rows
    sum to 1); afterwards the blocks count nothing more (tracking left on would add every
    later forward, training included, to the usage the report draws)."""
    import timm

    from bsr_kernels.moe import moe_blocks
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2,
                             embed_dim=32, num_heads=2, num_classes=2)
    tasks = mt.digits_tasks(16, (0.5,) * 3, (0.5,) * 3)[:2]
    model = mt.build_method(base, "moe_full", [t.num_classes for t in tasks], experts=4,
                            top_k=2)
    usage = mt.expert_usage(model, tasks, torch.device("cpu"), limit=8)
    assert sorted(usage) == [0, 1]
    for rows in usage.values():
        torch.testing.assert_close(torch.tensor(rows, dtype=torch.float64).sum(1),
                                   torch.ones(2, dtype=torch.float64))
    blocks = moe_blocks(model)
    assert not any(m.track_usage for _, m in blocks)
    before = [m.usage.clone() for _, m in blocks]
    model.train()(tasks[0].train.images[:4], 0)
    assert all(torch.equal(m.usage, b) for (_, m), b in zip(blocks, before))


def test_a_task_named_twice_is_refused_naming_it():
    with pytest.raises(ValueError, match="--task b=digits: task name 'b' given twice"):
        mt.data_tasks(["b=digits", "c=digits", "b=digits"], 16, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="--task must be NAME=DATA"):
        mt.data_tasks(["=digits"], 16, (0.5,) * 3, (0.5,) * 3)


# --- flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--seed", "-5"), ("--seed", "4294967296"),
    ("--head-lr-scale", "0"), ("--timing-rounds", "-3"), ("--threads", "-2"),
    ("--keep-rate", "2"), ("--keep-rate", "0"), ("--weight-decay", "-1"),
    ("--noise-std", "inf"), ("--profile-batch", "0")])
def test_bad_flag_values_exit_2_naming_the_flag(flag, value, capsys, monkeypatch):
    """Refused by the argument parser (exit 2, the flag named), before anything loads."""
    _no_loading(monkeypatch)
    with pytest.raises(SystemExit) as e:
        mt.main([*FAST, flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    """``bsr-finetune --multitask --help``: every option has help; no "(default: None)" /
    "(default: False)" noise nor a Python tuple; what a None default means is said."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--multitask", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "('moe_full'" not in text
    parser = mt.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert all(s in text for s in action.option_strings), action.option_strings
            if action.default is None and action.dest != "checkpoint":
                assert "default" in action.help, action.option_strings
    assert "(default: all)" in text and "--overwrite" in text


# --- optimizer and report -------------------------------------------------------------------

def _decay_split(opt, model):
    """(names with weight decay, names without) of ``opt``'s parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return tuple({names[id(p)] for g in opt.param_groups if (g["weight_decay"] > 0) == decay
                  for p in g["params"]} for decay in (True, False))


@pytest.mark.parametrize("method", mt.METHODS)
def test_weight_decay_skips_every_bias_the_experts_included(method):
    """--weight-decay decays weights, never biases: also not the MoE experts' stacked
    ``fc1_bias`` (E, H) and ``fc2_bias`` (E, C), which are 2-D (they were decayed). The rule is
    bsr-finetune's own (make_optimizer splits the same way)."""
    from timm.models.vision_transformer import VisionTransformer
    from bsr_kernels.finetune.train import make_optimizer

    torch.manual_seed(0)
    base = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)
    model = mt.build_method(base, method, [3, 2], experts=4, top_k=2)
    decayed, kept = _decay_split(mt._optimizer(model, 1e-3, 10.0, 0.05), model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept
    assert not [n for n in decayed if n.endswith("bias")]
    matrices = {n for n, p in model.named_parameters()
                if p.requires_grad and p.dim() >= 2 and n.endswith("weight")}
    assert matrices and matrices <= decayed                  # weights are still decayed
    if method in ("moe_full", "bsr_moe"):
        for name in ("vit.blocks.1.mlp.fc1_bias", "vit.blocks.1.mlp.fc2_bias"):
            assert name in kept
        for name in ("vit.blocks.1.mlp.fc1_weight", "vit.blocks.1.mlp.fc2_weight"):
            assert name in decayed
    assert _decay_split(make_optimizer(model, 1e-3, 10.0, 0.05), model) == (decayed, kept)


def _report_results():
    usage = [[0.5, 0.5], [0.25, 0.75]]
    return {m: {"tasks": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.75}},
                "mean_accuracy": 0.625, "saved_activation_mib_per_image": 1.5,
                **({"expert_usage": {"1": usage}} if "moe" in m else {})}
            for m in ("moe_full", "linear")}


def test_report_png_is_written_atomically(tmp_path, monkeypatch):
    """report.png goes through atomic_write like the single-task report: written to the temp
    file clean_orphans knows, fsync'ed, renamed; a savefig that fails midway leaves neither a
    partial report nor a temp file, and an earlier report whole (it left a .report.tmp.png)."""
    from matplotlib.figure import Figure

    path = tmp_path / "report.png"
    real_savefig, written = Figure.savefig, []

    def recorded(self, fname, *a, **k):
        written.append(Path(fname))
        return real_savefig(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", recorded)
    assert mt.draw_report(path, _report_results()) == path
    assert written == [checkpoint.tmp_name(path)]
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG"

    def torn(self, fname, *a, **k):
        Path(fname).write_bytes(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(OSError, match="disk full"):
        mt.draw_report(path, _report_results())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    path.unlink()
    with pytest.raises(OSError, match="disk full"):
        mt.draw_report(path, _report_results())
    assert list(tmp_path.iterdir()) == []


def test_memory_and_flops_are_measured_on_a_training_step(tmp_path, capsys, monkeypatch):
    """The profile runs in training mode (evaluation had left the models in eval mode, where
    gate noise and the aux loss are off and MoE blocks save less), with the training loss,
    aux loss included; the step times run in float32, as the multitask loop trains."""
    from bsr_kernels.finetune import train as train_mod
    prof_mod = importlib.import_module("bsr_kernels.profile")  # bsr_kernels.profile: a function
    seen, real = [], prof_mod.profile

    def spy(model, images, labels=None, loss_fn=None):
        with torch.no_grad():
            logits = model(images)
            seen.append((model.training, float(loss_fn(logits, labels)),
                         float(torch.nn.functional.cross_entropy(logits, labels)
                               + model.aux_loss())))
        return real(model, images, labels, loss_fn=loss_fn)
    monkeypatch.setattr(prof_mod, "profile", spy)
    amps, real_time = [], train_mod.time_steps
    monkeypatch.setattr(train_mod, "time_steps",
                        lambda *a, **k: amps.append(k.get("amp", "auto")) or real_time(*a, **k))
    rc, _, err = _run(["--method", "bsr_moe", *FAST[2:], *SMALL_MOE, "--aux-loss-weight", "0.5",
                       "--timing-rounds", "1"], capsys)
    assert rc == 0, err
    assert len(seen) == 1 and seen[0][0] is True, seen
    assert seen[0][1] == pytest.approx(seen[0][2]), seen   # the loss profiled is the training's
    assert amps == [None]


def test_memory_mode_takes_bsr_finetunes_modes(tmp_path, capsys):
    """--memory-mode as in bsr-finetune: auto, the default, is lean on a CPU; autograd trains
    the MoE blocks under plain autograd, which saves more activations (the profile's figure);
    the summary names the mode used."""
    saved = {}
    for given, used in ((None, "lean"), ("autograd", "autograd")):
        out = tmp_path / used
        rc, _, err = _run(["--method", "bsr_moe", *FAST[2:], *SMALL_MOE, "--out", out,
                           *(["--memory-mode", given] if given else [])], capsys)
        assert rc == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["memory_mode"] == used
        saved[used] = summary["methods"]["bsr_moe"]["saved_activation_mib_per_image"]
    assert saved["autograd"] > 2 * saved["lean"] > 0, saved


def _train_multitask(device: str, memory_mode: str, out: Path, capsys) -> dict:
    """The multitask demo's two BSR methods for 3 epochs on ``device``; their summary."""
    rc, _, err = _run(["--device", device, "--method", "bsr_moe,bsr_dense", "--epochs", "3",
                       "--batch-size", "64", "--experts", "4", "--top-k", "2",
                       "--timing-rounds", "1", "--profile-batch", "2",
                       "--memory-mode", memory_mode, "--out", out], capsys)
    assert rc == 0, err[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (CI has none; the GPU run's tests part runs it)")
@pytest.mark.parametrize("memory_mode", ["auto", "lean"])
def test_multitask_trains_on_cuda(memory_mode, tmp_path, capsys):
    """bsr-finetune --multitask on a GPU (``python -m benchmarks.bench_gpu --parts tests`` runs
    it): MoE and dense multitask BSR in autograd mode (auto on CUDA) and lean. Each finishes,
    its training loss falls, its 5-class digit task beats chance twice over, and the summary
    names the mode used. (On this CPU, with --device cpu and autograd: losses 0.80 -> 0.44 and
    0.82 -> 0.46, digit accuracy 71 % and 76 %.)"""
    summary = _train_multitask("cuda", memory_mode, tmp_path, capsys)
    assert summary["device"].startswith("cuda"), summary["device"]
    assert summary["memory_mode"] == ("autograd" if memory_mode == "auto" else memory_mode)
    for method, res in summary["methods"].items():
        history = res["history"]
        assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"], \
            (method, history)
        assert history[-1]["accuracy"]["digit"] > 0.4, (method, history)


# --- parsing and the round-robin loop (each survived a mutation before) ---------------------

def test_method_list_parses_as_in_bsr_finetune():
    """--method: names in any case and with spaces; a method named twice runs once, in the
    order first given (as bsr-finetune's --method); ``all`` is every method."""
    parse = mt.build_parser().parse_args
    assert parse(["--method", "bsr_moe, linear,BSR_MOE"]).method == ("bsr_moe", "linear")
    assert parse(["--method", "linear,linear"]).method == ("linear",)
    assert parse(["--method", " All "]).method == mt.METHODS


def test_top_k_may_equal_experts_but_not_exceed_them(capsys, monkeypatch):
    """--top-k at most --experts: equal is taken (the run goes on to load its data), one more
    is refused (exit 2, naming both) before anything loads."""
    class Loading(Exception):
        pass

    def loading(*a, **k):
        raise Loading
    monkeypatch.setattr(mt, "digits_tasks", loading)
    argv = ["--method", "moe_full", *FAST[2:], "--experts", "3"]
    with pytest.raises(Loading):
        mt.main([*argv, "--top-k", "3"])
    capsys.readouterr()
    rc, _, err = _run([*argv, "--top-k", "4"], capsys)
    assert rc == 2 and "--top-k (4) must not exceed --experts (3)" in err, err


class _Recorder(torch.nn.Module):
    """A stand-in multitask model: one linear head per task on flat inputs; records every
    training forward (task, inputs, logits) and the labels the loop computes in training."""

    def __init__(self, dim, classes):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, c) for c in classes)
        self.steps, self.labels = [], []

    def forward(self, x, task):
        out = self.heads[task](x)
        if self.training:
            self.steps.append((task, x.clone(), out.detach().clone()))
        return out

    def aux_loss(self):
        return None

    def label(self, y):
        if self.training:
            self.labels.append(y.clone())
        return y


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_round_robin_cycles_a_shorter_task_and_averages_the_loss_over_every_step():
    """train(): per batch position one step of each task in turn; a task with fewer batches
    cycles through its own shuffle (here 4 images in batches of 2 against 8 images: each of its
    images twice per epoch, batches 0, 1, 0, 1); the epoch's train_loss is the mean loss of all
    its steps (positions x tasks). Mutations that repeated the short task's last batch, or
    divided the loss by the positions only, passed the tests."""
    g = torch.Generator().manual_seed(0)
    sizes, classes = (8, 4), (3, 2)
    data = [(torch.randn(n, 5, generator=g), torch.randint(0, c, (n,), generator=g))
            for n, c in zip(sizes, classes)]
    model = _Recorder(5, classes)
    tasks = [mt.Task(f"t{i}", c, _Rows(x, y), _Rows(x, y), model.label, "")
             for i, ((x, y), c) in enumerate(zip(data, classes))]
    res = mt.train(model, tasks, 1, 2, 1e-2, 1.0, 0.0, 3, torch.device("cpu"),
                   log=lambda *a: None)
    assert [t for t, _, _ in model.steps] == [0, 1] * 4
    for task, (x, _) in enumerate(data):
        batches = [bx for t, bx, _ in model.steps if t == task]
        # each row seen as often as the epoch's 4 positions x 2 images cover the task
        seen = torch.cat(batches)
        counts = [int((seen == row).all(1).sum()) for row in x]
        assert counts == [8 // len(x)] * len(x), (task, counts)
        if len(x) == 4:
            assert torch.equal(batches[2], batches[0]) and torch.equal(batches[3], batches[1])
            assert not torch.equal(batches[0], batches[1])
    ce = torch.nn.functional.cross_entropy
    losses = [ce(out, y) for (_, _, out), y in zip(model.steps, model.labels)]
    assert len(losses) == 8
    assert res["history"][0]["train_loss"] == pytest.approx(float(torch.stack(losses).mean()))


def test_linear_probe_trains_the_task_heads_only():
    """linear: "a linear probe per task (frozen backbone)": only the heads train, each task's
    head from its own task's loss (a mutation that left the whole backbone trainable passed
    the tests)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)
    model = mt.build_method(base, "linear", [3, 2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"heads.{t}.{k}" for t in (0, 1) for k in ("weight", "bias")}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(x, 1).square().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"heads.1.weight", "heads.1.bias"}


def test_step_times_are_reported_relative_to_moe_full(tmp_path, capsys, monkeypatch):
    """summary.json's step_time_vs_moe_full is a method's step time over moe_full's (so moe_full
    is 1 and a method twice as fast 0.5), with timed steps stood in for (a mutation that
    inverted the ratio passed the tests)."""
    from bsr_kernels.finetune import train as train_mod
    times = {"moe_full": 0.04, "linear": 0.01}
    monkeypatch.setattr(train_mod, "time_steps",
                        lambda models, *a, **k: {m: times[m] for m in models})
    rc, _, err = _run(["--method", "moe_full,linear", *FAST[2:], *SMALL_MOE,
                         "--timing-rounds", "1", "--out", tmp_path], capsys)
    assert rc == 0, err
    methods = json.loads((tmp_path / "summary.json").read_text())["methods"]
    for method, t in times.items():
        assert methods[method]["step_time_s"] == t
        assert methods[method]["step_time_vs_moe_full"] == pytest.approx(t / times["moe_full"])
    assert methods["linear"]["step_time_vs_moe_full"] == pytest.approx(0.25)
