"""No data lost: a run killed with SIGKILL mid-epoch, or while writing result.json, and resumed
ends with the weights of an uninterrupted run; damaged or foreign checkpoints get clear errors.

The kills come from hooks this test installs in the child process (a wrapped ``train_step``, an
interrupted rename in :mod:`bsr_kernels.checkpoint`); production code has no kill switch."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bsr_kernels.finetune import cli
from bsr_kernels.finetune.train import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError,
                                         load_checkpoint, save_checkpoint)

from _same import assert_same

REPO = Path(__file__).resolve().parents[1]
# 597 training images / 128 = 4 steps per epoch; the digits data is augmented (random shifts),
# so the RNG state must be restored too.
ARGS = ["--method", "bsr", "--epochs", "3", "--batch-size", "128", "--seed", "3",
        "--timing-rounds", "0", "--profile-batch", "2", "--samples", "0", "--no-progress"]


# Runs bsr-finetune with kill hooks: TEST_KILL_AT_STEP=N SIGKILLs right after the N-th optimizer
# step, TEST_KILL_IN_EVAL=N at the start of the N-th evaluation (TEST_SIGNAL=SIG[xK]: sends SIG
# instead, K times; under torchrun TEST_KILL_RANK=R: only in process R); TEST_KILL_WRITING=NAME
# SIGKILLs while NAME is written (its temporary file cut to half, before the rename), as a
# crash mid-write would leave it.
_HOOKED_CLI = textwrap.dedent("""
    import os, signal, sys
    from bsr_kernels import checkpoint
    from bsr_kernels.finetune import cli, train

    def send():
        if os.environ.get("TEST_KILL_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
            return
        sig, _, times = os.environ.get("TEST_SIGNAL", "SIGKILL").partition("x")
        for _ in range(int(times or 1)):
            os.kill(os.getpid(), getattr(signal, sig))

    def hook(name, env):
        at, real, done = int(os.environ.get(env, "0")), getattr(train, name), [0]

        def hooked(*args, **kwargs):
            done[0] += 1
            if name == "evaluate" and done[0] == at:
                send()
            result = real(*args, **kwargs)
            if name == "train_step" and done[0] == at:
                send()
            return result
        if at:
            setattr(train, name, hooked)

    hook("train_step", "TEST_KILL_AT_STEP")
    hook("evaluate", "TEST_KILL_IN_EVAL")

    kill_writing = os.environ.get("TEST_KILL_WRITING")
    if kill_writing:
        real_replace = checkpoint._replace

        def replace(src, dst):
            if os.path.basename(dst) == kill_writing:
                data = open(src, "rb").read()
                open(src, "wb").write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        checkpoint._replace = replace
    sys.exit(cli.main(sys.argv[1:]))
""")


def _command(out: Path, *extra, env=None) -> tuple[list, dict]:
    """The hooked bsr-finetune's command line and environment."""
    return ([sys.executable, "-c", _HOOKED_CLI, *ARGS, "--out", str(out), *extra],
            dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _cli(out: Path, *extra, env=None):
    command, full_env = _command(out, *extra, env=env)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    whole = _cli(root / "whole")
    assert whole.returncode == 0, whole.stderr
    # Killed right after step 6: mid-way through epoch 2, epoch 1's checkpoint on disk.
    killed = _cli(root / "killed", env={"TEST_KILL_AT_STEP": "6"})
    after_kill = load_checkpoint(root / "killed" / "bsr" / "checkpoint.pt")
    resumed = _cli(root / "killed", "--resume")
    return root, whole, killed, after_kill, resumed


def _assert_same_optimizer(a, b):
    """The same optimizer state: the same parameters with state, every tensor and value of each
    (AdamW: step, exp_avg, exp_avg_sq) and the param groups (lr, betas, params, ...)."""
    sa, sb = a["optimizer"], b["optimizer"]
    assert sa["state"] and all("exp_avg" in s for s in sa["state"].values())
    assert_same(sa, sb, "optimizer")


def _assert_same_training(a, b):
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    _assert_same_optimizer(a, b)
    assert a["scheduler"] == b["scheduler"]
    assert a["history"] == b["history"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(runs):
    root, whole, killed, after_kill, resumed = runs
    assert killed.returncode == -signal.SIGKILL
    assert after_kill["epoch"] == 1 and after_kill["step"] == 4      # the last complete epoch
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout

    a = load_checkpoint(root / "whole" / "bsr" / "checkpoint.pt")
    b = load_checkpoint(root / "killed" / "bsr" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    changed = 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        changed += not torch.equal(a["model"][k], after_kill["model"][k])
    assert changed > 10                     # training really moved the weights after the kill
    _assert_same_optimizer(a, b)
    assert a["scheduler"] == b["scheduler"]
    assert a["history"] == b["history"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (root / "killed" / "bsr" / "delta.safetensors").is_file()
    # no temporary files left behind by the atomic writes of the finished run
    assert not [p for p in (root / "killed" / "bsr").iterdir() if ".tmp" in p.name]


def test_sigkill_while_writing_result_json_then_resume(runs):
    """Killed with result.json half written (a torn temporary file, no result.json): the resume
    removes the orphan, rebuilds result.json from the finished checkpoint without training, and
    everything equals the uninterrupted run."""
    root = runs[0]
    out = root / "killed_in_result"
    killed = _cli(out, env={"TEST_KILL_WRITING": "result.json"})
    assert killed.returncode == -signal.SIGKILL
    orphans = [p for p in (out / "bsr").iterdir() if ".tmp" in p.name]
    assert [p.name for p in orphans] == [f".result.json.tmp{p.name.rsplit('tmp', 1)[1]}"
                                         for p in orphans] and len(orphans) == 1
    assert not (out / "bsr" / "result.json").exists()
    assert (out / "bsr" / "checkpoint.pt").is_file()
    assert (out / "bsr" / "delta.safetensors").is_file()

    refused = _cli(out)                           # forgetting --resume destroys nothing
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert "removed 1 temporary file" in refused.stderr   # the orphan goes on any start
    assert (out / "bsr" / "checkpoint.pt").is_file()

    resumed = _cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    _assert_same_training(load_checkpoint(root / "whole" / "bsr" / "checkpoint.pt"),
                          load_checkpoint(out / "bsr" / "checkpoint.pt"))
    whole = json.loads((root / "whole" / "bsr" / "result.json").read_text())
    got = json.loads((out / "bsr" / "result.json").read_text())
    assert got["history"] == whole["history"] and got["accuracy"] == whole["accuracy"]


def test_resume_of_a_finished_run_keeps_its_result(runs, capsys):
    root = runs[0]
    rc = cli.main([*ARGS, "--out", str(root / "whole"), "--resume"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "finished in an earlier run" in out


def test_resume_reads_an_earlier_versions_step_time_as_the_loops_median(runs, tmp_path,
                                                                        capsys):
    """result.json of an earlier version named the training loop's median step ``step_time_s``,
    the name the table's side-by-side timing has now: a resume without timing showed it."""
    import shutil
    out = tmp_path / "old"
    shutil.copytree(runs[0] / "whole", out)
    result = json.loads((out / "bsr" / "result.json").read_text())
    median = result.pop("median_step_time_s")
    (out / "bsr" / "result.json").write_text(json.dumps({**result, "step_time_s": median}))
    assert cli.main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert "finished in an earlier run" in capsys.readouterr().out
    bsr = json.loads((out / "summary.json").read_text())["methods"]["bsr"]
    assert "step_time_s" not in bsr and bsr["median_step_time_s"] == median, bsr


def test_resume_refuses_a_corrupt_checkpoint(runs, tmp_path, capsys):
    root = runs[0]
    src = (root / "whole" / "bsr" / "checkpoint.pt").read_bytes()
    (tmp_path / "bsr").mkdir()
    (tmp_path / "bsr" / "checkpoint.pt").write_bytes(src[: len(src) // 2])    # truncated
    rc = cli.main([*ARGS, "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "checkpoint error" in err and "corrupt" in err and "checkpoint.pt" in err


def test_resume_refuses_a_checkpoint_of_other_settings(runs, tmp_path, capsys):
    root = runs[0]
    (tmp_path / "bsr").mkdir()
    (tmp_path / "bsr" / "checkpoint.pt").write_bytes(
        (root / "killed" / "bsr" / "checkpoint.pt").read_bytes())
    rc = cli.main([*ARGS, "--lr", "0.123", "--keep-rate", "0.7", "--out", str(tmp_path),
                   "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "other settings" in err and "lr" in err and "0.123" in err and "keep_rate" in err


def test_checkpoint_files_are_validated(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {"weights": torch.ones(3)})
    with pytest.raises(CheckpointError, match="not a bsr-finetune"):
        load_checkpoint(path)
    save_checkpoint(path, {"format": "bsr-finetune-checkpoint", "version": 99})
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]      # no temporary files


def test_load_checkpoint_compares_the_fingerprint_setting_by_setting(tmp_path):
    """Each setting a checkpoint recorded is compared with this run's, and each difference is
    named: one the run no longer has too; ``extendable`` ones may differ, ``optional`` ones
    only count where the checkpoint has them, ``normalize`` compares what two values stand
    for; ``epochs`` refuses a checkpoint past this run's end."""
    path = tmp_path / "c.pt"

    def write(fingerprint, epoch=2, partial=None):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                               "fingerprint": fingerprint, "model": {}, "optimizer": {},
                               "scheduler": {}, "rng": {}, "epoch": epoch, "step": 7,
                               **({"partial_epoch": partial} if partial else {})})

    saved = {"lr": 0.1, "epochs": 2, "amp": None, "mixup": 0.2}
    write(saved)
    assert load_checkpoint(path, dict(saved))["step"] == 7
    with pytest.raises(CheckpointError, match=r"other settings \(lr: checkpoint 0\.1, now 0\.3\)"):
        load_checkpoint(path, {**saved, "lr": 0.3})
    with pytest.raises(CheckpointError, match=r"\(mixup: checkpoint 0\.2, now unset\)"):
        load_checkpoint(path, {k: v for k, v in saved.items() if k != "mixup"})
    load_checkpoint(path, {**saved, "epochs": 5}, extendable=("epochs",))
    with pytest.raises(CheckpointError, match="epochs: checkpoint 2, now 5"):
        load_checkpoint(path, {**saved, "epochs": 5})
    load_checkpoint(path, {**saved, "data": "x"}, optional=("data",))   # recorded later
    with pytest.raises(CheckpointError, match="data: checkpoint None, now 'x'"):
        load_checkpoint(path, {**saved, "data": "x"})
    write({**saved, "data": "y"})
    with pytest.raises(CheckpointError, match="data: checkpoint 'y', now 'x'"):
        load_checkpoint(path, {**saved, "data": "x"}, optional=("data",))
    resolved = {"amp": lambda v: v or "bfloat16"}          # None: the default it resolves to
    load_checkpoint(path, {**saved, "data": "y", "amp": "bfloat16"}, normalize=resolved)
    with pytest.raises(CheckpointError, match="amp: checkpoint None, now 'float16'"):
        load_checkpoint(path, {**saved, "data": "y", "amp": "float16"}, normalize=resolved)

    write(saved, epoch=2)
    assert load_checkpoint(path, epochs=2)["epoch"] == 2       # finished: nothing to train
    with pytest.raises(CheckpointError, match="already trained 2 epochs.*--epochs 2 or more"):
        load_checkpoint(path, epochs=1)
    write(saved, epoch=2, partial={"batches": 3, "loss_sum": 1.5})
    assert load_checkpoint(path, epochs=3)["partial_epoch"]["batches"] == 3
    with pytest.raises(CheckpointError, match=r"inside epoch 3 \(after 3 of its batches\), "
                                              "past --epochs 2; pass --epochs 3"):
        load_checkpoint(path, epochs=2)


def test_the_rng_state_of_a_checkpoint_restores_every_generator(tmp_path):
    """torch's, Python's ``random`` (timm's augmentations) and NumPy's generators, through a
    checkpoint file and back: the draws after a restore repeat those after the save."""
    import random

    import numpy as np

    from bsr_kernels.finetune.train import _rng_state, _set_rng_state, seed_all

    def draw():
        return (torch.rand(3).tolist(), [random.random() for _ in range(3)],
                np.random.rand(3).tolist(), np.random.randn(1).tolist())

    seed_all(11)
    draw()   # its one Gaussian leaves the pair's second cached in NumPy's state
    assert np.random.get_state()[3] == 1
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": _rng_state()})
    after_save = draw()
    seed_all(12)
    draw()
    _set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draw() == after_save


def _assert_same_run(a, b):
    """Two final checkpoints of the same training, bitwise: weights, the whole optimizer state,
    scheduler, history (losses and accuracies per epoch) and RNG."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for key in ("model", "optimizer", "scheduler", "history", "rng"):
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_boundary_and_resume_is_exact(runs, tmp_path, sig):
    """SIGTERM (preemption) or Ctrl-C mid-epoch: the step finishes, the checkpoint is written
    inside the epoch (2 of its 4 batches done), the exit status is 128 + the signal; --resume
    continues from that step and ends bitwise where the uninterrupted run ended."""
    root = runs[0]
    stopped = _cli(tmp_path, env={"TEST_KILL_AT_STEP": "6", "TEST_SIGNAL": sig})
    assert stopped.returncode == 128 + getattr(signal, sig), stopped.stderr
    assert "at a step boundary" in stopped.stderr and "--resume" in stopped.stderr
    state = load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 6
    assert state["partial_epoch"]["batches"] == 2 and len(state["history"]) == 1
    resumed = _cli(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch 1 and 2 batches of the next (step 6)" in resumed.stdout
    _assert_same_run(load_checkpoint(root / "whole" / "bsr" / "checkpoint.pt"),
                     load_checkpoint(tmp_path / "bsr" / "checkpoint.pt"))


@pytest.mark.parametrize("when", ["TEST_KILL_AT_STEP=12", "TEST_KILL_IN_EVAL=3"])
def test_a_signal_in_the_last_epochs_end_stops_before_the_next_method(runs, tmp_path, when):
    """SIGTERM at the last step of a method's final epoch, or during its evaluation: the
    final checkpoint is written and the run stops (exit 143) instead of training the next
    method; --resume finishes the method from that checkpoint without training it again
    (bitwise the uninterrupted run), then trains the next one."""
    root = runs[0]
    env = dict([when.split("=")], TEST_SIGNAL="SIGTERM")
    stopped = _cli(tmp_path, "--method", "bsr,linear", env=env)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "at a step boundary" in stopped.stderr and "--resume" in stopped.stderr
    state = load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")
    assert state["epoch"] == 3 and state["step"] == 12 and "partial_epoch" not in state
    assert not (tmp_path / "linear").exists() and not (tmp_path / "bsr" / "result.json").exists()
    resumed = _cli(tmp_path, "--method", "bsr,linear", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "bsr: resumed from" in resumed.stdout and "after epoch 3 (step 12)" in resumed.stdout
    assert "bsr epoch" not in resumed.stdout and "linear epoch 3/3" in resumed.stdout
    _assert_same_run(load_checkpoint(root / "whole" / "bsr" / "checkpoint.pt"),
                     load_checkpoint(tmp_path / "bsr" / "checkpoint.pt"))
    assert (tmp_path / "bsr" / "result.json").is_file()
    assert (tmp_path / "linear" / "result.json").is_file()


def test_sigterm_to_the_process_group_with_workers_saves_at_a_step_boundary(tmp_path):
    """SIGTERM to the whole process group (SLURM's scancel, ``kill -TERM -PGID``) with
    --workers 2: the DataLoader workers ignore it (they would die of it, and the run with
    them), the main process saves at the step boundary and exits 143; --resume continues."""
    command, env = _command(tmp_path, "--workers", "2", "--log-interval", "1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "bsr epoch 1/3 step 1/4" in line:     # training: the workers are running
                os.killpg(proc.pid, signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "at a step boundary" in err and "Traceback" not in err, err
    state = load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")
    assert 1 <= state["step"] < 12
    resumed = _cli(tmp_path, "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")["step"] == 12


def test_a_second_signal_stops_at_once(tmp_path):
    """Two Ctrl-C: the second stops at once (exit 130) without writing a checkpoint of the
    unfinished epoch; epoch 1's is still there."""
    stopped = _cli(tmp_path, env={"TEST_KILL_AT_STEP": "6", "TEST_SIGNAL": "SIGINTx2"})
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted" in stopped.stderr
    state = load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 4 and "partial_epoch" not in state


def test_save_every_steps_loses_at_most_those_steps_to_a_kill(runs, tmp_path):
    """--save-every-steps 3 and a SIGKILL after step 7: the checkpoint of step 6 (mid epoch 2)
    is on disk, and --resume from it ends bitwise where the uninterrupted run ended."""
    root = runs[0]
    killed = _cli(tmp_path, "--save-every-steps", "3", env={"TEST_KILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    state = load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")
    assert state["step"] == 6 and state["partial_epoch"]["batches"] == 2
    # --epochs 1: the checkpoint's weights are past epoch 1 (they were returned as its result,
    # beside epoch 1's accuracy); refused, naming the epoch to pass, the checkpoint untouched
    short = _cli(tmp_path, "--resume", "--epochs", "1")
    assert short.returncode == 2 and "saved inside epoch 2" in short.stderr, short.stderr
    assert "--epochs 2 or more" in short.stderr
    assert load_checkpoint(tmp_path / "bsr" / "checkpoint.pt")["step"] == 6
    resumed = _cli(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(load_checkpoint(root / "whole" / "bsr" / "checkpoint.pt"),
                     load_checkpoint(tmp_path / "bsr" / "checkpoint.pt"))
