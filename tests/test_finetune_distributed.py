"""Beyond one machine: bsr-finetune under torchrun with gloo (CPU), 2 processes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bsr_kernels.finetune.data import (DIGITS_TARGET_CLASSES, GlobalBatchSampler, build_data,
                                       digits_split)
from bsr_kernels.finetune.models import DIGITS_MODEL, build_model, model_input_config
from bsr_kernels.finetune.train import adapt

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 32

WORKER = textwrap.dedent("""
    import sys
    import torch, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, {tests!r})
    from test_finetune_distributed import SHORT, batch_and_model
    from bsr_kernels.finetune.train import setup_distributed, teardown_distributed, train_step

    info = setup_distributed("cpu")
    for method in ("full", "bsr"):
        x, y, model, _ = batch_and_model(method, info.rank, info.world_size)
        ddp = DDP(model)
        F.cross_entropy(ddp(x), y).backward()           # DDP averages over the 2 processes
        if info.rank == 0:
            torch.save({{n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
                       sys.argv[1] + f"/{{method}}.pt")
    # the one short batch of a training set smaller than the batch: 15 images, 8 and 7
    x, y, model, scale = batch_and_model("full", info.rank, info.world_size, SHORT)
    ddp = DDP(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)   # a step that leaves the gradients
    loss = torch.tensor(train_step(ddp, x, y, sgd, loss_scale=scale), dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    if info.rank == 0:
        torch.save({{"loss": loss.item() / info.world_size, "grads": {{
            n: p.grad for n, p in model.named_parameters() if p.requires_grad}}}},
                   sys.argv[1] + "/short.pt")
    teardown_distributed()
""")


SHORT = 15   # training images of the short-batch case: fewer than GLOBAL_BATCH


def batch_and_model(method: str, rank: int, world: int, n=None):
    """This process's share of the first global batch of epoch 0 (with ``n``, of the first
    ``n`` training images, fewer than a batch: the one short batch, kept and split unevenly),
    a fresh model, and ``bsr-finetune``'s loss scale for the share."""
    size, mean, std = model_input_config(DIGITS_MODEL)
    data = build_data("digits", size, mean, std, digits_shift=0)
    n = len(data.train) if n is None else n
    sampler = GlobalBatchSampler(n, GLOBAL_BATCH, rank, world, seed=0,
                                 drop_last=n >= GLOBAL_BATCH)
    sampler.set_epoch(0)
    idx = next(iter(sampler))
    x = torch.stack([data.train[i][0] for i in idx])
    y = torch.tensor([data.train[i][1] for i in idx])
    torch.manual_seed(0)
    model, _ = build_model(DIGITS_MODEL, data.num_classes)
    return x, y, adapt(model, method).train(), len(idx) * world / sampler.global_count(0)


# --- the process group, without processes -------------------------------------------------

def test_setup_distributed_refuses_an_unknown_or_missing_device(monkeypatch):
    from bsr_kernels.finetune.distributed import setup_distributed
    with pytest.raises(ValueError, match="--device must be cpu or cuda, got 'tpu'"):
        setup_distributed("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
        setup_distributed("cuda")


@pytest.fixture
def fake_group(monkeypatch):
    """torch.distributed's process group calls recorded instead of made (and the torchrun
    variables cleared, 8 CPU cores, torch's thread count restored afterwards)."""
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls) and calls[-1] != "destroy")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_setup_distributed_reads_torchrun_variables(fake_group, monkeypatch):
    """One process: no group, cpu, and torch's thread count left alone. Under torchrun: rank,
    world size and local rank from RANK, WORLD_SIZE and LOCAL_RANK; gloo on CPU, the cores
    shared by this machine's processes (LOCAL_WORLD_SIZE, else WORLD_SIZE); NCCL on the
    local rank's GPU when CUDA is available and no device is named."""
    from bsr_kernels.finetune.distributed import DistInfo, setup_distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(3)
    info = setup_distributed()
    assert info == DistInfo(0, 1, 0, torch.device("cpu")) and info.is_main
    assert not info.distributed and fake_group == [] and torch.get_num_threads() == 3
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = setup_distributed("cpu")
    assert info == DistInfo(3, 4, 1, torch.device("cpu")) and info.distributed
    assert not info.is_main and fake_group == ["gloo"] and torch.get_num_threads() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    fake_group.clear()
    assert setup_distributed("cpu").world_size == 4 and torch.get_num_threads() == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    fake_group.clear()
    assert setup_distributed("cpu") == DistInfo(1, 2, 1, torch.device("cpu"))
    assert fake_group == ["gloo"]
    fake_group.clear()
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    assert setup_distributed() == DistInfo(1, 2, 1, torch.device("cuda", 1))
    assert fake_group == ["nccl"] and devices == [1]
    fake_group.clear()
    assert setup_distributed("cpu").device == torch.device("cpu") and fake_group == ["gloo"]


def test_barrier_and_teardown_wait_for_every_process(fake_group):
    """barrier waits only with more than one process; teardown leaves the group after a last
    barrier (a peer's collectives may still be in flight), and does nothing without one."""
    from bsr_kernels.finetune.distributed import DistInfo, barrier, teardown_distributed
    teardown_distributed()
    barrier(DistInfo())
    assert fake_group == []
    barrier(DistInfo(1, 2))
    assert fake_group == ["barrier"]
    fake_group[:] = ["gloo"]        # a group was made
    teardown_distributed()
    assert fake_group == ["gloo", "barrier", "destroy"]


#: What a worker prints when the C++ runtime aborts it (seen once in CI on 2026-11-28: rank 1
#: of the gradient fixture, SIGABRT, the code passing before and after): a crash of the
#: process, not a wrong result, so the launch is tried once more; any other failure is not.
_ABORT = "terminate called without an active exception"


def _torchrun(*args, timeout=300, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for attempt in range(2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", *map(str, args)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or _ABORT not in r.stderr:
            return r
    return r


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    r = _torchrun(script, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["full", "bsr"])
def test_two_process_gradients_match_one_process_on_the_same_global_batch(ddp_dir, method):
    ddp_grads = torch.load(ddp_dir / f"{method}.pt")

    x, y, model, _ = batch_and_model(method, 0, 1)
    assert x.shape[0] == GLOBAL_BATCH
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ddp_grads.keys()
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(ddp_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_a_short_batch_split_unevenly_weighs_every_image_the_same(ddp_dir):
    """A training set smaller than the batch (15 images, shares of 8 and 7 at 2 processes) was
    trained on the mean of the processes' means, weighting the images 1/16 and 1/14: loss and
    gradients differed from one process's. With train_step's loss_scale they equal them, and
    the mean of the processes' losses is the batch's mean loss."""
    short = torch.load(ddp_dir / "short.pt")
    x, y, model, scale = batch_and_model("full", 0, 1, SHORT)
    assert x.shape[0] == SHORT and scale == 1.0
    shares = [batch_and_model("full", r, 2, SHORT)[0].shape[0] for r in (0, 1)]
    assert shares == [8, 7]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert short["loss"] == pytest.approx(loss.item(), rel=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == short["grads"].keys()
    for n, g in grads.items():
        torch.testing.assert_close(short["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


# bsr-finetune, with each process's training losses (train_step's results) written on exit
RECORDING_CLI = textwrap.dedent("""
    import json, os, sys
    from bsr_kernels.finetune import cli, train

    real, losses = train.train_step, []

    def recorded(*args, **kwargs):
        losses.append(real(*args, **kwargs))
        return losses[-1]

    train.train_step = recorded
    try:
        sys.exit(cli.main(sys.argv[2:]))
    finally:
        with open(os.path.join(sys.argv[1], f"losses{os.environ['RANK']}.json"), "w") as f:
            json.dump(losses, f)
""")


def test_torchrun_gloo_run_completes(tmp_path):
    """Two gloo processes train and evaluate; the accuracy (the test set sharded over the
    processes, counts summed) is that of the saved weights over the whole test set in one
    process, and the training loss of each epoch is that of the global batches: the mean of
    both processes' losses, not the main process's own."""
    script = tmp_path / "recording.py"
    script.write_text(RECORDING_CLI)
    r = _torchrun(script, tmp_path, "--method", "bsr,linear", "--epochs", "2",
                  "--batch-size", "128", "--timing-rounds", "0", "--profile-batch", "2",
                  "--samples", "2", "--no-progress", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    _, test = digits_split(DIGITS_TARGET_CLASSES, summary["img_size"])
    steps = 597 // 128
    losses = [json.loads((tmp_path / f"losses{rank}.json").read_text()) for rank in (0, 1)]
    assert len(losses[0]) == len(losses[1]) == 2 * 2 * steps     # 2 methods, 2 epochs each
    for i, m in enumerate(("bsr", "linear")):
        res = summary["methods"][m]
        assert len(res["history"]) == 2 and res["accuracy"] == res["history"][-1]["accuracy"]
        assert res["steps"] == 2 * steps        # global steps, not per process
        for e, row in enumerate(res["history"]):
            at = slice((2 * i + e) * steps, (2 * i + e + 1) * steps)
            own, other = losses[0][at], losses[1][at]
            mean = sum((a + b) / 2 for a, b in zip(own, other)) / steps
            assert row["train_loss"] == pytest.approx(mean, rel=1e-9), (m, e)
            assert abs(sum(own) / steps - mean) > 1e-4, (m, e)   # the shares' losses differ
        assert (tmp_path / "o" / m / "checkpoint.pt").is_file()
        state = torch.load(tmp_path / "o" / m / "checkpoint.pt", weights_only=True)
        model, _ = build_model(DIGITS_MODEL, 5)
        adapt(model, m).load_state_dict(state["model"])
        with torch.no_grad():
            correct = (model.eval()(test.images).argmax(-1) == test.labels).sum().item()
        assert res["accuracy"] == pytest.approx(correct / len(test), abs=1e-12), m
    assert r.stdout.count("epoch 2/2") == 2                # only rank 0 prints


def test_a_signal_to_one_process_in_the_final_evaluation_stops_every_process(tmp_path):
    """SIGTERM to process 1 only, during the evaluation of a method's final epoch: both
    processes stop after the final checkpoint (exit 143 each, no hang), and neither trains the
    next method."""
    from test_finetune_resume import _HOOKED_CLI
    script = tmp_path / "hooked.py"
    script.write_text(_HOOKED_CLI)
    r = _torchrun(script, "--method", "bsr,linear", "--epochs", "1", "--batch-size", "128",
                  "--timing-rounds", "0", "--samples", "0", "--no-progress",
                  "--out", tmp_path / "o",
                  env={"TEST_KILL_IN_EVAL": "1", "TEST_SIGNAL": "SIGTERM",
                       "TEST_KILL_RANK": "1"})
    assert r.returncode != 0 and r.stderr.count("stopped by signal 15") == 2, r.stderr[-3000:]
    assert "exitcode: 143" in r.stderr or "exit code: 143" in r.stderr, r.stderr[-3000:]
    state = torch.load(tmp_path / "o" / "bsr" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and "partial_epoch" not in state
    assert not (tmp_path / "o" / "linear").exists() and "linear epoch" not in r.stdout


MAIN_FIRST = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from bsr_kernels.finetune.cli import _main_first
    from bsr_kernels.finetune.train import setup_distributed, teardown_distributed, train_step

    info, out = setup_distributed("cpu"), Path(sys.argv[1])
    def fetch():   # a download: the main process's copy must be complete before the others
        if info.is_main:
            time.sleep(0.5)
            (out / "fetched").write_text("done")
            return "fetched"
        return (out / "fetched").read_text()
    seen = {"result": _main_first(info, fetch)}
    def fails():
        if info.is_main:
            raise RuntimeError("no network here")
        return "ran"
    try:
        seen["second"] = _main_first(info, fails)
    except Exception as e:
        seen["second"] = f"{type(e).__name__}: {e}"
    (out / f"rank{info.rank}.json").write_text(json.dumps(seen))
    teardown_distributed()
""")


def test_downloads_run_on_the_main_process_first(tmp_path):
    """Under torchrun, a torchvision download or hub weights were fetched by every process at
    once into the same files. _main_first runs them on the main process, then on the others;
    an error there reaches every process instead of leaving them waiting (no hang)."""
    script = tmp_path / "main_first.py"
    script.write_text(MAIN_FIRST)
    r = _torchrun(script, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert seen[0] == {"result": "fetched", "second": "RuntimeError: no network here"}
    assert seen[1] == {"result": "done", "second": "ValueError: no network here"}
