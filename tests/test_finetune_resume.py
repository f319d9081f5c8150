"""No data lost: a run killed with SIGKILL mid-epoch and resumed ends with the weights of an
uninterrupted run; damaged or foreign checkpoints get clear errors."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsr_kernels.finetune import cli
from bsr_kernels.finetune.train import (KILL_ENV, CheckpointError, load_checkpoint,
                                        save_checkpoint)

REPO = Path(__file__).resolve().parents[1]
# 597 training images / 128 = 4 steps per epoch; the digits data is augmented (random shifts),
# so the RNG state must be restored too.
ARGS = ["--method", "bsr", "--epochs", "3", "--batch-size", "128", "--seed", "3",
        "--timing-rounds", "0", "--profile-batch", "2", "--samples", "0", "--no-progress"]


def _cli(out: Path, *extra, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "bsr_kernels.finetune", *ARGS, "--out",
                           str(out), *extra], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    whole = _cli(root / "whole")
    assert whole.returncode == 0, whole.stderr
    # Killed right after step 6: mid-way through epoch 2, epoch 1's checkpoint on disk.
    killed = _cli(root / "killed", env={KILL_ENV: "6"})
    after_kill = load_checkpoint(root / "killed" / "bsr" / "checkpoint.pt")
    resumed = _cli(root / "killed", "--resume")
    return root, whole, killed, after_kill, resumed


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
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert a["scheduler"] == b["scheduler"]
    assert a["history"] == b["history"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (root / "killed" / "bsr" / "delta.safetensors").is_file()
    # no temporary files left behind by the atomic writes of the finished run
    assert not [p for p in (root / "killed" / "bsr").iterdir() if ".tmp" in p.name]


def test_resume_of_a_finished_run_keeps_its_result(runs, capsys):
    root = runs[0]
    rc = cli.main([*ARGS, "--out", str(root / "whole"), "--resume"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "finished in an earlier run" in out


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
