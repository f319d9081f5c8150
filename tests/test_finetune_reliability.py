"""bsr-finetune reliability (issue 13) and its timm-like command line (issue 12): no silent
wrong results, no lost runs, early and clear errors."""
import csv
import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsr_kernels import checkpoint
from bsr_kernels.finetune import cli, train
from bsr_kernels.ops.dispatch import available_backends, forced_backend

from _same import assert_same

FAST = ["--method", "linear", "--epochs", "1", "--batch-size", "128", "--timing-rounds", "0",
        "--profile-batch", "2", "--samples", "0", "--no-progress"]


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _ctrl_c_at_call(real, n: int):
    """``real`` wrapped to raise KeyboardInterrupt (a Ctrl-C) at its n-th call; returns the
    wrapper and the list that counts its calls."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    return wrapper, calls


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"{path}: bare {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def _no_loading(monkeypatch):
    """Fails the test if data or weights are loaded."""
    def boom(*a, **k):
        raise AssertionError("data or weights were loaded before --out was checked")
    monkeypatch.setattr(cli, "build_data", boom)
    monkeypatch.setattr(cli, "build_model", boom)


# --- 4: NaN guard ------------------------------------------------------------------------

def test_non_finite_loss_stops_with_a_clear_error_and_writes_nothing(tmp_path, capsys):
    rc, out, err = _run(["--method", "bsr", "--epochs", "2", "--lr", "1e10", *FAST[4:],
                         "--out", tmp_path], capsys)
    assert rc == cli.EXIT_DIVERGED == 3
    assert "training diverged" in err and "nan" in err and "--lr" in err
    assert not (tmp_path / "bsr").exists()                  # no delta of NaN tensors
    assert not (tmp_path / "summary.json").exists()
    for p in tmp_path.rglob("*.json"):
        _strict_json(p)


def test_json_is_strict_everywhere(tmp_path):
    from bsr_kernels.finetune.report import write_summary
    path = write_summary(tmp_path / "s.json", {"bsr": {"accuracy": float("nan"),
                                                       "loss": float("inf")}})
    assert _strict_json(path)["methods"]["bsr"] == {"accuracy": None, "loss": None}


def test_the_table_and_csv_show_missing_and_non_finite_values_as_empty(tmp_path):
    """A NaN or missing figure prints as "-" in the table (not "nan %"); in summary.csv a
    non-finite or missing value is an empty cell, which spreadsheet and pandas readers take as
    missing ("inf" and "nan" are not numbers to every reader)."""
    from bsr_kernels.finetune.report import HISTORY_COLUMNS, format_table, write_history_csv
    table = format_table({"bsr": {"accuracy": float("nan"), "memory_mode": "lean",
                                  "step_time_s": 0.0125, "trainable_params": 1234},
                          "linear": {"accuracy": 0.875, "saved_activation_mib_per_image": None}})
    bsr, linear = table.splitlines()[2:]
    assert bsr.split()[:4] == ["BSR", "(lean)", "-", "-"] and "12.5 ms" in bsr and "1,234" in bsr
    assert "87.5 %" in linear and "nan" not in table
    path = write_history_csv(tmp_path / "h.csv", {"bsr": [
        {"epoch": 1, "train_loss": float("inf"), "test_loss": float("nan"), "accuracy": None,
         "lr": 1e-3}]})
    assert path.read_text().splitlines() == [",".join(HISTORY_COLUMNS), "bsr,1,,,,0.001"]


# --- 6: a used --out is not destroyed; one writer at a time ------------------------------

def test_used_out_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "linear" / "checkpoint.pt"
    before = ckpt.read_bytes()
    rc, _, err = _run([*FAST, "--epochs", "2", "--out", tmp_path], capsys)
    assert rc == 2
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert ckpt.read_bytes() == before
    rc, _, err = _run([*FAST, "--seed", "1", "--out", tmp_path, "--overwrite"], capsys)
    assert rc == 0, err
    assert "--overwrite: deleted the earlier run" in err
    assert torch.load(ckpt, weights_only=True)["fingerprint"]["seed"] == 1
    assert not (tmp_path / ".lock").exists()                 # released at the end


def test_an_out_holding_only_args_json_takes_a_new_run(tmp_path, capsys):
    """A run stopped before its first checkpoint leaves args.json alone: nothing to lose, so a
    new run there needs neither --resume nor --overwrite, and records its own options."""
    checkpoint.write_json(tmp_path / "args.json", {"args": {"seed": 5}},
                          format=cli.ARGS_FORMAT, version=1)
    rc, _, err = _run([*FAST, "--seed", "2", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "args.json").read_text())["args"]["seed"] == 2
    assert (tmp_path / "linear" / "checkpoint.pt").is_file()


def test_a_checkpoint_records_the_bsr_settings_only_for_bsr():
    """--keep-rate, --train-blocks, --drop-at and --activation-dtype change only BSR's
    training: the other methods' checkpoints record None for them, so a resumed run that
    changes them is refused for bsr alone."""
    args = cli.build_parser().parse_args(["--keep-rate", "0.7", "--train-blocks", "1,2",
                                          "--drop-at", "2", "--activation-dtype", "bfloat16"])
    bsr_only = ("keep_rate", "train_blocks", "drop_at", "activation_dtype")
    fp = cli._fingerprint(args, "bsr", 10, 32, 1e-3, torch.device("cpu"))
    assert [fp[k] for k in bsr_only] == [0.7, [1, 2], [2], "bfloat16"]
    for method in cli.METHODS:
        if method != "bsr":
            fp = cli._fingerprint(args, method, 10, 32, 1e-3, torch.device("cpu"))
            assert [fp[k] for k in bsr_only] == [None] * 4, method


def test_out_is_locked_by_a_live_process_and_a_stale_lock_is_taken_over(tmp_path, capsys,
                                                                         monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{sleeper.pid}\n")
        _no_loading(monkeypatch)
        rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
        assert rc == 2
        assert f"process {sleeper.pid}" in err and ".lock" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    monkeypatch.undo()
    # Its process is dead now: the lock is stale and taken over.
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    assert not (tmp_path / ".lock").exists()


def test_run_lock_unit(tmp_path):
    lock = checkpoint.RunLock(tmp_path).acquire()
    pid, started, host = (tmp_path / ".lock").read_text().split()
    assert int(pid) == os.getpid() and host == checkpoint._hostname()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("")                      # being created by someone now
    with pytest.raises(checkpoint.RunLockedError, match="starting now"):
        checkpoint.RunLock(tmp_path).acquire()


def test_run_lock_refuses_a_second_lock_of_the_same_process(tmp_path):
    """Two RunLocks of one folder in one process both held it (the lock file's PID, this
    process's, was taken for a leftover), and either release deleted the other's lock file. The
    second is refused now; a leftover lock file naming this process, which no RunLock holds
    (a container's recurring PID), is still taken over."""
    a = checkpoint.RunLock(tmp_path).acquire()
    with pytest.raises(checkpoint.RunLockedError, match="this process, through another RunLock"):
        checkpoint.RunLock(tmp_path / "sub" / "..").acquire()   # the same folder, spelt otherwise
    assert a.held and (tmp_path / ".lock").exists()
    a.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(f"{os.getpid()} - {checkpoint._hostname()}\n")
    b = checkpoint.RunLock(tmp_path).acquire()
    assert b.held
    b.release()
    assert not (tmp_path / ".lock").exists()
    with checkpoint.RunLock(tmp_path):
        pass
    checkpoint.RunLock(tmp_path).acquire().release()   # released on leaving the block


def test_file_mode_reads_the_umask_without_setting_it(monkeypatch):
    """Every atomic_write read the umask by setting it to 0 and back: files that other threads
    created meanwhile got mode 0o666. The mode now comes from /proc (the import-time umask
    where there is none), with os.umask never called."""
    umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask was called"))
        assert checkpoint._file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(umask)


_LOCKER = """import sys, time
from bsr_kernels.checkpoint import RunLock, RunLockedError
try:
    RunLock(sys.argv[1]).acquire()
except RunLockedError as e:
    print("refused:", e, flush=True)
    sys.exit()
print("held", flush=True)
time.sleep(60)
"""


def _other_process_locks(folder):
    """(process, its answer): another process tries ``RunLock(folder).acquire()``; its answer is
    "held" (it then stays alive, holding the lock) or "refused: <message>"."""
    proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_stale_lock_taken_over_by_two_processes_at_once_has_one_winner(tmp_path, monkeypatch):
    """Processes A and B both find a stale lock: B reads it (its process is dead), then A takes
    it over, then B acts on what it read. Only A holds the folder, and B names A's process
    (B deleted A's fresh lock and created its own: both wrote the folder)."""
    lock_file = tmp_path / ".lock"
    lock_file.write_text(f"{_dead_pid()} - {checkpoint._hostname()}\n")
    b = checkpoint.RunLock(tmp_path)
    real_owner, others = b._owner, []

    def owner_then_a_takes_over():
        found = real_owner()
        if not others:                          # B has read the stale lock, A goes first
            others.append(_other_process_locks(tmp_path))
        return found

    monkeypatch.setattr(b, "_owner", owner_then_a_takes_over)
    try:
        with pytest.raises(checkpoint.RunLockedError) as refused:
            b.acquire()
        a, answer = others[0]
        assert answer == "held"
        assert f"process {a.pid}" in str(refused.value) and not b.held
        assert int(lock_file.read_text().split()[0]) == a.pid
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        for proc, _ in others:
            proc.kill()
            proc.wait()


def test_stale_lock_takeover_shuts_out_a_second_taker_midway(tmp_path, monkeypatch):
    """While B takes over a stale lock (it holds the stale file's flock and is writing its own
    lock), process C, which finds the same stale lock, is refused: one winner, B."""
    lock_file = tmp_path / ".lock"
    lock_file.write_text(f"{_dead_pid()} - {checkpoint._hostname()}\n")
    real_write, others = checkpoint.atomic_write, []

    def c_tries_then_write(path, data):
        if path == lock_file and not others:
            others.append(_other_process_locks(tmp_path))
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", c_tries_then_write)
    try:
        lock = checkpoint.RunLock(tmp_path).acquire()
        c, answer = others[0]
        assert answer.startswith("refused:") and "taking over the stale lock" in answer, answer
        assert lock.held and int(lock_file.read_text().split()[0]) == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
        lock.release()
        assert not lock_file.exists()
    finally:
        for proc, _ in others:
            proc.kill()
            proc.wait()


_FLOCK_HOLDER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("flocked", flush=True)
time.sleep(60)
"""


def test_a_stale_lock_replaced_before_the_flock_is_looked_at_again(tmp_path, monkeypatch):
    """A opens the stale lock file and takes its flock; meanwhile another process has put
    another stale file at ``.lock`` and is taking that one over (it holds that file's flock).
    A must not act on the file it opened, now gone: it looks again and finds the takeover
    under way (acting on it, A and the other process both held the folder)."""
    import fcntl
    lock_file = tmp_path / ".lock"
    stale = f"{_dead_pid()} - {checkpoint._hostname()}\n"
    lock_file.write_text(stale)
    real_flock, holders = fcntl.flock, []

    def flock_after_a_swap(fd, op):
        if not holders:
            (tmp_path / "swap").write_text(stale)
            os.replace(tmp_path / "swap", lock_file)
            holders.append(subprocess.Popen([sys.executable, "-c", _FLOCK_HOLDER,
                                             str(lock_file)], stdout=subprocess.PIPE, text=True))
            assert holders[0].stdout.readline().strip() == "flocked"
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_swap)
    try:
        with pytest.raises(checkpoint.RunLockedError, match="taking over the stale lock"):
            checkpoint.RunLock(tmp_path).acquire()
        assert lock_file.read_text() == stale
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


def test_a_lock_is_released_only_while_it_names_this_process(tmp_path):
    """release() deletes the lock file only while it names this process: one that another
    process holds by then (ours deleted by hand, say) stays."""
    lock = checkpoint.RunLock(tmp_path).acquire()
    other = f"{_dead_pid()} - {checkpoint._hostname()}\n"
    (tmp_path / ".lock").write_text(other)
    lock.release()
    assert not lock.held and (tmp_path / ".lock").read_text() == other


def test_a_process_of_another_user_counts_as_alive(tmp_path, monkeypatch):
    """A PID that signal 0 may not reach (PermissionError) is a live process of another user:
    its temporary files stay, and its lock is respected."""
    pid = os.getpid() + 1

    def denied(p, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(checkpoint.os, "kill", denied)
    assert checkpoint._pid_alive(pid)
    tmp = tmp_path / f".a.tmp{pid}"
    tmp.write_text("x")
    assert checkpoint.clean_orphans(tmp_path) == [] and tmp.exists()
    monkeypatch.setattr(checkpoint, "_start_time", lambda p: None)
    (tmp_path / ".lock").write_text(f"{pid} - {checkpoint._hostname()}\n")
    with pytest.raises(checkpoint.RunLockedError, match=rf"\(process {pid}\) is writing"):
        checkpoint.RunLock(tmp_path).acquire()


# --- 8: damaged result.json ----------------------------------------------------------------

def test_damaged_result_json_is_named_and_rebuilt_after_deleting_it(tmp_path, capsys):
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    result = tmp_path / "linear" / "result.json"
    good = _strict_json(result)
    assert good["format"] == cli.RESULT_FORMAT and good["version"] == 1
    result.write_text("")
    rc, _, err = _run([*FAST, "--out", tmp_path, "--resume"], capsys)
    assert rc == 2
    assert str(result) in err and "damaged" in err and "delete it" in err
    result.unlink()
    rc, out, err = _run([*FAST, "--out", tmp_path, "--resume"], capsys)
    assert rc == 0, err
    assert "after epoch 1" in out                           # rebuilt, not retrained
    rebuilt = _strict_json(result)
    assert rebuilt["history"] == good["history"] and rebuilt["accuracy"] == good["accuracy"]


def test_read_json_refuses_another_format_or_version_naming_the_file_and_the_fix(tmp_path):
    path = checkpoint.write_json(tmp_path / "r.json", {"a": 1}, format="fmt", version=2)
    assert checkpoint.read_json(path, "a result", "rerun", format="fmt", versions=(1, 2)) == {
        "format": "fmt", "version": 2, "a": 1}
    for fmt, versions, found in (("fmt", (1,), "'fmt' version 2"),
                                 ("other", (2,), "'fmt' version 2")):
        with pytest.raises(checkpoint.DamagedFileError) as e:
            checkpoint.read_json(path, "a result", "rerun", format=fmt, versions=versions)
        assert str(path) in str(e.value) and found in str(e.value)
        assert str(e.value).endswith("; rerun")
    unversioned = checkpoint.write_json(tmp_path / "u.json", {"a": 1})
    with pytest.raises(checkpoint.DamagedFileError, match="format None version None"):
        checkpoint.read_json(unversioned, "a result", "rerun", format="fmt", versions=(1,))


# --- 9: orphaned temporary files -----------------------------------------------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_orphaned_temporary_files_are_removed_on_start(tmp_path, capsys):
    (tmp_path / "linear").mkdir()
    orphan = tmp_path / "linear" / f".checkpoint.pt.tmp{_dead_pid()}"
    orphan.write_bytes(b"\0" * 1000)
    rc, _, err = _run([*FAST, "--out", tmp_path, "--resume"], capsys)
    assert rc == 0, err
    assert not orphan.exists() and "removed 1 temporary file" in err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_clean_orphans_keeps_files_of_live_writers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".a.tmp{live.pid}"
        dead = tmp_path / f".b.tmp{_dead_pid()}"
        other = tmp_path / ".notes.tmpx"
        # this process's own: it is not writing while it cleans (a container's PID 1 finds
        # the orphans of an earlier PID 1 under its own PID)
        own = tmp_path / f".c.tmp{os.getpid()}"
        for p in (mine, dead, other, own):
            p.write_text("x")
        assert checkpoint.clean_orphans(tmp_path) == [dead, own]
        assert mine.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_atomic_write_gives_ordinary_modes_and_leaves_no_temporary_file(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = checkpoint.atomic_write(tmp_path / "x.bin", lambda t: (t.write_bytes(b"1"),
                                                                   os.chmod(t, 0o600)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(tmp_path / "x.bin", lambda t: (t.write_bytes(b"2"),
                                                               (_ for _ in ()).throw(
                                                                   RuntimeError("disk"))))
    assert path.read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_atomic_write_over_a_file_keeps_its_mode(tmp_path, mode):
    """open(path, "w") and torch.save keep an existing file's mode; every atomic save (a
    checkpoint, a delta, a report) gave it 0o666 less the umask again, so a checkpoint made
    private with chmod 600 became readable by others at the next save."""
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    for data in (b"new", lambda t: (t.write_bytes(b"newer"), os.chmod(t, 0o600))):
        checkpoint.atomic_write(path, data)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"newer"
    checkpoint.atomic_write(tmp_path / "new.pt", b"1")   # a new file: ordinary mode
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o666 & ~umask


# --- 10: a bad --out is found before anything is loaded ------------------------------------

def test_out_that_is_a_file_fails_before_loading(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run([*FAST, "--out", f], capsys)
    assert rc == 2 and "--out" in err and "is a file" in err


def test_a_batch_that_does_not_split_over_the_processes_fails_before_loading(tmp_path, capsys,
                                                                             monkeypatch):
    """--batch-size 6 with 4 processes (torchrun, as setup_distributed would report it) is
    refused naming both numbers, before --out is claimed or anything is loaded; 8 is not."""
    from bsr_kernels.finetune.distributed import DistInfo
    _no_loading(monkeypatch)
    monkeypatch.setattr(cli, "setup_distributed", lambda device: DistInfo(0, 4))
    argv = [*FAST, "--out", tmp_path / "run"]
    argv[argv.index("--batch-size") + 1] = "6"
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    assert "--batch-size 6 must be a multiple of the number of processes (4)" in err, err
    assert not (tmp_path / "run").exists()
    argv[argv.index("--batch-size") + 1] = "8"
    _, _, err = _run(argv, capsys)   # passes (and stops later: there is no process group)
    assert "must be a multiple" not in err, err


def test_args_json_that_cannot_be_written_fails_and_releases_the_lock(tmp_path, capsys,
                                                                      monkeypatch):
    """A write error in the claimed --out (args.json, here a full disk) is named as --out that
    cannot be written, and the lock is released: the same process then runs there."""
    real = cli.write_json

    def full(path, *a, **k):
        raise OSError(28, "No space left on device", str(path))
    with monkeypatch.context() as m:
        _no_loading(m)
        m.setattr(cli, "write_json", full)
        rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 2 and "--out" in err and "No space left on device" in err, err
    assert not (tmp_path / ".lock").exists()
    assert cli.write_json is real
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("name", ["summary.json", "summary.csv", "report.png"])
def test_an_out_holding_a_runs_summary_or_report_is_a_used_out(name, tmp_path, capsys,
                                                               monkeypatch):
    """A folder holding a run's summary or report alone (its method folders deleted) is a run
    too: refused without --resume or --overwrite, naming the file, before anything loads."""
    _no_loading(monkeypatch)
    (tmp_path / name).write_bytes(b"an earlier run's")
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 2 and f"already holds a run ({name})" in err, err
    assert (tmp_path / name).read_bytes() == b"an earlier run's"


def test_out_that_cannot_be_written_fails_before_loading(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:       # root writes anywhere: make the lock file creation fail
        def denied(self):
            raise PermissionError(13, "Permission denied", str(self.path))
        monkeypatch.setattr(checkpoint.RunLock, "acquire", denied)
    else:
        ro.chmod(0o500)
    try:
        rc, _, err = _run([*FAST, "--out", ro], capsys)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "--out" in err and "cannot write there" in err
    assert "Permission denied" in err and "Traceback" not in err


# --- 11 and 13: image folders -------------------------------------------------------------

def _write_image_folder(root: Path, counts):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = (torch.rand(20, 20, 3, generator=g) * 120).to(torch.uint8)
            img[..., c % 3] += 120
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")


def _folder_args(path, out=None):
    return ["--data", path, "--method", "linear", "--epochs", "1", "--batch-size", "4",
            "--timing-rounds", "0", "--profile-batch", "2", "--samples", "0", "--no-progress",
            *(["--out", out] if out else [])]


def test_unreadable_images_are_listed_at_start_or_skipped_with_a_count(tmp_path, capsys):
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    (pics / "cat" / "empty.png").write_bytes(b"")
    (pics / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    rc, _, err = _run(_folder_args(pics), capsys)
    assert rc == 2
    assert "2 of 14 image files cannot be read" in err
    assert "empty.png" in err and "junk.jpg" in err and "--bad-images skip" in err
    rc, _, err = _run(_folder_args(pics) + ["--bad-images", "skip"], capsys)
    assert rc == 0, err
    assert "warning" in err and "skipped 2 of 14 image files" in err


def test_a_truncated_jpeg_is_found_at_start_up(tmp_path, capsys):
    """PIL's verify() reads a JPEG's headers only: a JPEG cut in half passed the start-up check
    and stopped the run when training reached it, --bad-images skip or not."""
    from PIL import Image
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    noise = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255)
    Image.fromarray(noise.to(torch.uint8).numpy()).save(tmp_path / "whole.jpg", quality=90)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (pics / "dog" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    rc, _, err = _run(_folder_args(pics), capsys)
    assert rc == 2 and "1 of 13 image files cannot be read" in err and "cut.jpg" in err, err
    assert "truncated" in err
    rc, _, err = _run(_folder_args(pics) + ["--bad-images", "skip"], capsys)
    assert rc == 0 and "skipped 1 of 13 image files" in err, err


def test_skipping_every_image_of_a_class_is_refused_naming_it(tmp_path, capsys):
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    (pics / "owl").mkdir()
    for i in range(3):
        (pics / "owl" / f"{i}.jpg").write_bytes(b"no image %d" % i)
    rc, _, err = _run(_folder_args(pics) + ["--bad-images", "skip"], capsys)
    assert rc == 2 and "class folder(s) owl with no readable training image" in err, err


def test_hidden_folders_are_no_class_and_the_folder_set_pickles(tmp_path):
    """A .ipynb_checkpoints folder (empty here) beside the class folders stopped the run with
    'holds no images'; the dataset's class is built lazily and must still pickle by name (a
    DataLoader worker started by spawn unpickles it in a fresh interpreter)."""
    import pickle
    from bsr_kernels.finetune import data
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 2, "dog": 3})
    (pics / ".ipynb_checkpoints").mkdir()
    ds = data._image_folder(pics, None)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    blob = pickle.dumps(ds)
    del data._VisibleImageFolder  # as in a fresh interpreter: found again through __getattr__
    back = pickle.loads(blob)
    assert back.classes == ["cat", "dog"] and [c for _, c in back.samples] == [0, 0, 1, 1, 1]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (an image of uniform noise came out
    91 % white)."""
    import numpy as np
    from PIL import Image
    from bsr_kernels.finetune import data
    g = np.random.default_rng(0)
    a = g.integers(0, 65536, size=(9, 7), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(data._load_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (9, 7, 3) and rgb.dtype == np.uint8
    want = np.rint(a / 257.0).astype(np.uint8)
    assert (rgb == want[..., None]).all()
    eight = g.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)  # 8-bit RGB: unchanged
    Image.fromarray(eight).save(tmp_path / "rgb.png")
    assert (np.asarray(data._load_image(str(tmp_path / "rgb.png"))) == eight).all()


def test_resume_over_a_changed_image_folder_is_refused(tmp_path, capsys):
    """Images added to the folder between a run and its --resume re-drew the held-out split
    (trained images in the test set) and mixed two test sets in the history, silently. The
    checkpoint now records the split sizes and the classes; one written before resumes."""
    from PIL import Image
    pics, out = tmp_path / "pics", tmp_path / "run"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    rc, _, err = _run(_folder_args(pics, out), capsys)
    assert rc == 0, err
    ckpt = out / "linear" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["fingerprint"]["data_images"] == [10, 2]
    assert state["fingerprint"]["data_classes"].startswith("2 classes, sha256 ")
    for i in range(6, 11):
        Image.open(pics / "cat" / "0.png").save(pics / "cat" / f"{i}.png")
    rc, _, err = _run(["--resume", out, "--epochs", "2"], capsys)
    assert rc == 2 and "other settings" in err and "data_images: checkpoint [10, 2], now " \
        "[14, 3]" in err, err
    for k in ("data_images", "data_classes"):   # a checkpoint of before: resumes
        del state["fingerprint"][k]
    torch.save(state, ckpt)
    rc, printed, err = _run(["--resume", out, "--epochs", "2"], capsys)
    assert rc == 0 and "resumed from" in printed + err, err


def test_a_class_missing_from_the_test_split_is_warned(tmp_path, capsys):
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6, "owl": 1})
    rc, _, err = _run(_folder_args(pics), capsys)
    assert rc == 0, err
    assert "warning" in err and "owl (1 image)" in err and "test accuracy does not cover" in err


# --- 12: overflows -----------------------------------------------------------------------

def test_huge_warmup_is_warmup_throughout(tmp_path, capsys):
    rc, _, err = _run([*FAST, "--warmup-epochs", "1e308", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert "OverflowError" not in err


@pytest.mark.parametrize("flag", ["--lr", "--head-lr-scale"])
def test_a_learning_rate_above_float32_is_refused_naming_the_flag(flag, capsys):
    """A rate the optimizer's float32 arithmetic cannot hold (1e39: a traceback from AdamW) is
    a usage error (exit 2) naming the option and the limit; the largest float32 parses."""
    with pytest.raises(SystemExit) as e:
        cli.main([flag, "1e39", *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "3.403e+38" in err and "Traceback" not in err, err
    top = cli.build_parser().parse_args([flag, str(cli.FLOAT32_MAX)])
    assert getattr(top, flag[2:].replace("-", "_")) == cli.FLOAT32_MAX


def test_block_and_method_lists_parse_as_the_help_says():
    """``--drop-at none`` (any case, or empty) drops nothing; indices take spaces; a method
    named twice runs once, in the order first given; ``all`` is every method."""
    parse = cli.build_parser().parse_args
    for value in ("none", "NONE", " None ", ""):
        assert parse(["--drop-at", value]).drop_at == ()
    assert parse(["--train-blocks", " 3, 7,11 "]).train_blocks == (3, 7, 11)
    assert parse(["--method", "bsr,linear,BSR"]).method == ("bsr", "linear")
    assert parse(["--method", "all"]).method == cli.METHODS


@pytest.mark.parametrize("flag,value", [("--weight-decay", "inf"), ("--warmup-epochs", "inf"),
                                        ("--warmup-epochs", "nan"), ("--keep-rate", "nan"),
                                        ("--lr", "inf"), ("--drop-at", "3,x")])
def test_non_finite_or_malformed_values_exit_2_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_an_optimizer_step_that_overflows_float32_is_a_divergence(tmp_path, capsys):
    """--lr 3e37 parses, but AdamW's first step size (the head's 3e38 / (1 - 0.9)) overflows
    float32: the run stops as diverged (exit 3, naming the step and --lr), no traceback, and
    writes no delta."""
    rc, _, err = _run([*FAST, "--lr", "3e37", "--warmup-epochs", "0", "--out", tmp_path],
                      capsys)
    assert rc == cli.EXIT_DIVERGED, err
    assert "training diverged" in err and "overflowed float32 at step 1" in err, err
    assert "--lr" in err and "Traceback" not in err
    assert not (tmp_path / "linear" / "delta.safetensors").exists()


def test_a_divergence_names_every_groups_rate_not_the_first_groups():
    """The message quoted param_groups[0]'s rate: the head's for linear (--lr times
    --head-lr-scale), a backbone group's for the others, so it named one of two rates."""
    from timm.models.vision_transformer import VisionTransformer
    from bsr_kernels.finetune.distributed import DistInfo
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=3)
    both = train.make_optimizer(model, lr=2e-4, head_lr_scale=10.0)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    head = train.make_optimizer(model, lr=2e-4, head_lr_scale=10.0)
    assert both.param_groups[0]["lr"] == 2e-4 and head.param_groups[0]["lr"] == 2e-3
    for opt, rates in ((both, "learning rates 0.0002, 0.002)"), (head, "learning rate 0.002)")):
        with pytest.raises(train.TrainingDivergedError, match=re.escape(rates)):
            train._check_finite(float("nan"), DistInfo(), "m", 0, 4, opt, None)
    with pytest.raises(train.TrainingDivergedError,
                       match=re.escape("learning rates 0.0002, 0.002:")):
        with train.overflow_diverges(both, "m", 0, 4):
            raise RuntimeError("value cannot be converted to type float without overflow")


@pytest.mark.parametrize("seed", ["9223372036854775808", "4294967296", "-1"])
def test_seed_out_of_range_names_the_flag(seed, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--seed", seed, *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "4294967295" in err


# --- issue 12: the command line in timm's habits -----------------------------------------

def test_resume_path_extends_training_and_writes_args_and_csv(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _run([*FAST, "--out", run], capsys)
    assert rc == 0, err
    args = _strict_json(run / "args.json")
    assert args["format"] == "bsr-finetune-args" and args["args"]["epochs"] == 1
    assert "measuring" in out and out.index("measuring") < out.index("linear probe")
    # --resume PATH (the run folder), two more epochs: continues after epoch 1.
    rc, out, err = _run([*[a for a in FAST if a != "1"][:2], "--epochs", "3",
                         *FAST[4:], "--resume", run], capsys)
    assert rc == 0, err
    assert "after epoch 1" in out
    hist = _strict_json(run / "linear" / "result.json")["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["epoch"]) for r in rows] == [("linear", "1"), ("linear", "2"),
                                                           ("linear", "3")]
    assert float(rows[-1]["accuracy"]) == pytest.approx(hist[-1]["accuracy"])
    # --resume a checkpoint file; fewer epochs than trained is refused clearly.
    rc, _, err = _run([*FAST, "--resume", run / "linear" / "checkpoint.pt"], capsys)
    assert rc == 2 and "already trained 3 epochs" in err and "--epochs 3" in err
    rc, _, err = _run([*FAST, "--resume", tmp_path / "nowhere"], capsys)
    assert rc == 2 and "no such run folder" in err
    # another file of the run, even in a method folder, is neither the folder nor a checkpoint
    rc, _, err = _run([*FAST, "--resume", run / "linear" / "result.json"], capsys)
    assert rc == 2 and "expected the --out folder of an earlier run" in err, err
    rc, _, err = _run([*FAST, "--resume", run, "--out", tmp_path / "other"], capsys)
    assert rc == 2 and "its own folder" in err


def test_summary_csv_holds_every_finished_epoch_of_a_stopped_run(tmp_path, capsys,
                                                                  monkeypatch):
    """summary.csv is written after each epoch, not only at the end: a run stopped in epoch 2
    (Ctrl-C in its evaluation) has epoch 1's row there, as in its checkpoint."""
    stop_in_epoch_2, calls = _ctrl_c_at_call(train.evaluate, 2)
    monkeypatch.setattr(train, "evaluate", stop_in_epoch_2)
    argv = [*FAST, "--out", tmp_path]
    argv[argv.index("--epochs") + 1] = "2"
    rc, _, err = _run(argv, capsys)
    assert rc == 130 and len(calls) == 2, err
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["epoch"]) for r in rows] == [("linear", "1")]
    state = torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert float(rows[0]["accuracy"]) == pytest.approx(state["history"][0]["accuracy"])


def test_random_init_and_surgery_are_warned(tmp_path, capsys, monkeypatch):
    _no_train = ["--epochs", "1", "--batch-size", "128", "--timing-rounds", "0",
                 "--profile-batch", "2", "--samples", "0", "--no-progress", "--method", "linear"]
    rc, _, err = _run(["--model", "vit_tiny_patch16_224", "--img-size", "32", *_no_train],
                      capsys)
    assert rc == 0, err
    assert "warning" in err and "random weights" in err
    # The shipped digits weights at another input size: the position embedding is resampled.
    rc, _, err = _run(["--img-size", "32", *_no_train], capsys)
    assert rc == 0, err
    assert "position embedding was resampled" in err


def test_a_model_without_weights_starts_from_the_seeds_weights(tmp_path, capsys):
    """A timm model without weights (random) is drawn from --seed, whatever torch's RNG did
    before the run: the same command trains the same weights."""
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", *FAST]
    for i, out in enumerate(("a", "b")):
        torch.manual_seed(100 + i)
        rc, _, err = _run([*argv, "--out", tmp_path / out], capsys)
        assert rc == 0, err
    a, b = (torch.load(tmp_path / out / "linear" / "checkpoint.pt", weights_only=True)
            for out in ("a", "b"))
    assert_same(a["model"], b["model"])


def test_checkpoint_with_another_head_is_warned(tmp_path, capsys):
    from safetensors.torch import load_file

    from bsr_kernels.finetune.models import DIGITS_MODEL, assets_dir
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    ckpt = tmp_path / "start.pt"
    torch.save({"state_dict": load_file(str(assets_dir() / f"{DIGITS_MODEL}.safetensors"))},
               ckpt)
    rc, _, err = _run(_folder_args(pics) + ["--checkpoint", ckpt], capsys)
    assert rc == 0, err
    assert "classifier head has another shape" in err and "2-class head" in err


def test_pretrained_offline_fails_fast_with_the_offline_hint(monkeypatch, capsys):
    import huggingface_hub.constants as hf
    import timm

    from bsr_kernels.finetune import models
    seen = []
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            seen.append(hf.HF_HUB_OFFLINE)
            raise OSError("Cannot find the requested files in the local cache")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", create)
    before = hf.HF_HUB_OFFLINE
    rc, _, err = _run(["--model", "vit_tiny_patch16_224", "--pretrained", "--img-size", "32",
                       *FAST], capsys)
    assert rc == 2
    assert seen == [True]                       # the hub client ran cache-only: no retries
    assert hf.HF_HUB_OFFLINE == before
    assert "not reachable" in err and "HF_HUB_OFFLINE=1" in err and "--checkpoint" in err


def test_help_is_clean():
    parser = cli.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            full = cli._HelpFormatter("x")._get_help_string(action).replace(
                "%(default)s", str(action.default))
            assert full.count("(default") <= 1, (action.option_strings, full)
            # a help that mentions a default (so the formatter appends none) states its own:
            # --warmup-epochs said "(default: cosine decay to 0)", --sched's, and not its 1.0
            if "default" in action.help and action.default not in (None, False):
                assert str(action.default) in action.help, action.option_strings
    for flag in ("--resume", "--overwrite", "--bad-images", "--seed", "--weight-decay",
                 "--warmup-epochs"):
        assert flag in text
    assert "warm-up throughout), then the --sched schedule (default: 1.0)" in " ".join(
        text.split())


def test_no_kill_switch_in_the_training_loop():
    import inspect
    assert not hasattr(train, "KILL_ENV")
    src = inspect.getsource(train)
    assert "SIGKILL" not in src and "os.kill" not in src


def test_report_shows_the_samples_kept_tokens_and_a_run_ends_without_matplotlib(
        tmp_path, capsys, monkeypatch):
    """report.png gets --samples test images and the blocks BSR drops at (no pictures with
    --samples 0); without matplotlib the run still ends with its JSON, saying there is no PNG."""
    seen = []

    def draw_report(path, results, images, kept, patch, drop_at, **k):
        seen.append(None if images is None else (images.shape[0], tuple(drop_at), patch))
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(cli, "draw_report", draw_report)
    for samples in ("2", "0"):
        argv = ["--method", "bsr", *FAST[2:], "--out", tmp_path / samples]
        argv[argv.index("--samples") + 1] = samples
        rc, _, err = _run(argv, capsys)
        assert rc == 0 and "no PNG report (No module named 'matplotlib')" in err, err
        assert (tmp_path / samples / "summary.json").is_file()
    assert seen == [(2, (3, 6, 9), 4), None]


def test_report_draws_curves_from_the_history(tmp_path):
    from bsr_kernels.finetune.report import draw_report
    hist = lambda a: [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e,  # noqa: E731
                       "accuracy": a * e / 3, "lr": 1e-3} for e in (1, 2, 3)]
    results = {"full": {"accuracy": 0.9, "history": hist(0.9)},
               "bsr": {"accuracy": 0.8, "history": hist(0.8) + [{"epoch": 4,
                                                                  "train_loss": None}]}}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = []
    real_plot = plt.Axes.plot
    plt.Axes.plot = lambda self, *a, **k: drawn.append(k.get("label")) or real_plot(self, *a,
                                                                                     **k)
    try:
        path = draw_report(tmp_path / "r.png", results)
    finally:
        plt.Axes.plot = real_plot
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert drawn == ["full", "bsr"] * 3                  # train loss, test loss, accuracy


def test_run_lock_sees_pid_reuse_and_other_hosts(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock_file = tmp_path / ".lock"
    try:
        started = checkpoint._start_time(live.pid)
        host = checkpoint._hostname()
        lock_file.write_text(f"{live.pid} {started} {host}\n")
        with pytest.raises(checkpoint.RunLockedError, match=f"process {live.pid}"):
            checkpoint.RunLock(tmp_path).acquire()
        if started is not None:       # the PID now names another process: stale
            lock_file.write_text(f"{live.pid} 1 {host}\n")
            checkpoint.RunLock(tmp_path).acquire().release()
        lock_file.write_text(f"{_dead_pid()} - other-host-xyz\n")
        with pytest.raises(checkpoint.RunLockedError, match="on other-host-xyz") as refused:
            checkpoint.RunLock(tmp_path).acquire()
        # its process cannot be checked from here: delete it if that run is over (not "if that
        # process is not bsr-finetune": it is one, maybe dead, e.g. a requeued SLURM job)
        assert "delete the lock file if that run is no longer running" in str(refused.value)
        assert "not bsr-finetune" not in str(refused.value)
    finally:
        live.kill()
        live.wait()


def test_photo_transforms_follow_the_model_data_config():
    """timm's data config (interpolation, crop_pct) drives the transforms (issue 12)."""
    from torchvision import transforms as T

    from bsr_kernels.finetune.data import _transforms
    from bsr_kernels.finetune.models import model_data_config
    cfg = model_data_config("vit_base_patch16_224")       # bicubic, crop_pct 0.9: no download
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.9
    train, test = _transforms(224, cfg["mean"], cfg["std"], False, cfg)
    def flat(c):
        return [t for s in c.transforms for t in (flat(s) if isinstance(s, T.Compose) else [s])]
    resize = next(t for t in flat(test) if isinstance(t, T.Resize))
    assert resize.size == 248 and resize.interpolation == T.InterpolationMode.BICUBIC
    crop = next(t for t in flat(train) if "RandomResizedCrop" in type(t).__name__)
    assert crop.scale == (0.35, 1.0)
    assert "bicubic" in str(crop.interpolation).lower()
    from PIL import Image
    img = Image.new("L", (300, 260))                    # grey: converted to RGB first
    assert test(img).shape == (3, 224, 224) and train(img).shape == (3, 224, 224)


def test_opt_picks_any_timm_optimizer(tmp_path, capsys):
    rc, _, err = _run([*FAST, "--opt", "bogus_opt", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "--opt" in err and "timm" in err
    assert not (tmp_path / "x").exists()                 # refused before --out is touched
    rc, _, err = _run([*FAST, "--opt", "SGD", "--out", tmp_path / "sgd"], capsys)
    assert rc == 0, err
    state = torch.load(tmp_path / "sgd" / "linear" / "checkpoint.pt", weights_only=True)
    assert state["fingerprint"]["opt"] == "sgd"
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    default = train.make_optimizer(torch.nn.Linear(2, 2), 1e-3)
    assert type(default) is torch.optim.AdamW             # the default is unchanged


def _bsr_under_amp_bf16(out, capsys, monkeypatch):
    """``--method bsr --amp bf16`` on CPU: runs under bf16 autocast (recorded in the checkpoint
    fingerprint) when the CPU kernels take bf16, else is refused naming --amp before anything
    is loaded. Returns which of the two happened."""
    bsr = ["--method", "bsr", *FAST[2:], "--amp", "bf16", "--device", "cpu"]
    try:
        cli._check_amp("bf16", torch.device("cpu"))
    except ValueError as e:
        with monkeypatch.context() as m:
            _no_loading(m)
            rc, _, err = _run(bsr, capsys)
        assert rc == 2 and "--amp bf16" in err and "--amp off" in err, err
        assert str(e) in err
        return "refused"
    else:
        seen = []
        real = train._autocast
        with monkeypatch.context() as m:
            m.setattr(train, "_autocast", lambda d, amp="auto": seen.append(
                train.resolve_amp(amp, d)) or real(d, amp))
            rc, _, err = _run([*bsr, "--out", out], capsys)
        assert rc == 0, err
        assert seen and set(seen) == {torch.bfloat16}
        fp = torch.load(out / "bsr" / "checkpoint.pt", weights_only=True)
        assert fp["fingerprint"]["amp"] == "bfloat16"
        return "ran"


def test_amp_flag(tmp_path, capsys, monkeypatch):
    # CPU: --amp bf16 autocasts the plain methods (recorded in the checkpoint fingerprint) ...
    seen = []
    real = train._autocast
    monkeypatch.setattr(train, "_autocast", lambda d, amp="auto": seen.append(
        train.resolve_amp(amp, d)) or real(d, amp))
    rc, _, err = _run([*FAST, "--amp", "bf16", "--out", tmp_path / "bf16"], capsys)
    assert rc == 0, err
    assert seen and set(seen) == {torch.bfloat16}
    fp = torch.load(tmp_path / "bf16" / "linear" / "checkpoint.pt", weights_only=True)
    assert fp["fingerprint"]["amp"] == "bfloat16"
    monkeypatch.undo()
    # ... and BSR (lean, the default) runs under it with the default CPU backend, the C++
    # kernels (the drop runs outside autocast, in float32); only where no backend can run on
    # the CPU (the extension not built) is it refused naming --amp, before anything is loaded.
    default = forced_backend() or "cpp"
    want = "ran" if default in available_backends("cpu") else "refused"
    assert _bsr_under_amp_bf16(tmp_path / "bsr_default", capsys, monkeypatch) == want
    # The pure-PyTorch reference backend takes bf16 q and k: there BSR really runs under it.
    monkeypatch.setenv("BSR_BACKEND", "reference")
    assert _bsr_under_amp_bf16(tmp_path / "bsr_reference", capsys, monkeypatch) == "ran"
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        cli.main(["--amp", "fp8", *FAST])
    assert "--amp" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_amp_that_bsr_cannot_run_is_refused_before_loading(where, tmp_path, capsys,
                                                           monkeypatch):
    """--amp bf16 where BSR fails under bf16 autocast, in its forward or only in its backward
    (a kernel without a bf16 gradient), is refused naming --amp before anything loads; the
    probe that finds it leaves torch's RNG as it was (it also runs before seeded runs)."""
    rp = importlib.import_module("bsr_kernels.reprogram")   # the package's name is the function
    rng = torch.get_rng_state()
    cli._check_amp("bf16", torch.device("cpu"))   # this BSR runs under bf16: nothing refused
    assert torch.equal(torch.get_rng_state(), rng)
    real = rp.reprogram

    class NoBf16(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.amp = torch.is_autocast_enabled("cpu")
            if ctx.amp and where == "forward":
                raise RuntimeError("no bf16 forward kernel")
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if ctx.amp:
                raise NotImplementedError("no bf16 backward kernel")
            return grad

    def reprogram(model, *a, **k):
        model = real(model, *a, **k)
        model.register_forward_hook(lambda mod, inp, out: NoBf16.apply(out))
        return model
    monkeypatch.setattr(rp, "reprogram", reprogram)
    with monkeypatch.context() as m:
        _no_loading(m)
        rc, _, err = _run(["--method", "bsr", *FAST[2:], "--amp", "bf16", "--device", "cpu",
                           "--out", tmp_path / "run"], capsys)
    assert rc == 2 and f"no bf16 {where} kernel" in err, err
    assert "--amp bf16: bsr_kernels cannot run BSR under bfloat16 autocast" in err, err
    assert not (tmp_path / "run").exists()
    rc, _, err = _run(["--method", "bsr", *FAST[2:], "--amp", "off", "--device", "cpu"],
                      capsys)
    assert rc == 0, err   # off: no autocast, nothing to probe


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(tmp_path, capsys):
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    rc, _, err = _run([*FAST, "--data", tmp_path / "no_such_dir", "--out", tmp_path,
                       "--overwrite"], capsys)
    assert rc == 2 and "--data" in err
    assert (tmp_path / "linear" / "checkpoint.pt").is_file()
    assert (tmp_path / "summary.json").is_file()


def test_overwrite_keeps_the_old_run_when_the_bsr_settings_are_refused(tmp_path, capsys):
    """--overwrite with BSR settings that reprogram refuses (a block past the model's depth,
    found once the model is built): the old run is still there, whole."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
              and p.name not in ("args.json", ".lock")}
    assert tmp_path / "linear" / "checkpoint.pt" in before
    rc, _, err = _run(["--method", "bsr", *FAST[2:], "--train-blocks", "3,99", "--out",
                       tmp_path, "--overwrite"], capsys)
    assert rc == 2 and "--train-blocks index 99" in err and "deleted" not in err, err
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("out", [False, True])
def test_refused_bsr_settings_stop_the_run_before_any_method_trains(out, tmp_path, capsys,
                                                                    monkeypatch):
    """BSR settings that reprogram refuses once the model is built (a block past its depth),
    with the other methods listed first: exit 2 naming the flag before any method has
    trained (they took minutes on a real model, then the run stopped at BSR), and no --out
    folder left behind."""
    fits = []
    monkeypatch.setattr(cli, "fit", lambda *a, **k: fits.append(a) or pytest.fail("trained"))
    run = tmp_path / "run"
    rc, _, err = _run(["--method", "linear,full,bsr", *FAST[2:], "--train-blocks", "3,99",
                       *(["--out", run] if out else [])], capsys)
    assert rc == 2 and "--train-blocks index 99 is outside the model's blocks" in err, err
    assert not fits and not run.exists()


def test_an_error_before_training_leaves_the_out_folder_as_it_was(tmp_path, capsys):
    """A run that stops on a usage or input error before writing anything leaves ``--out`` as it
    found it: the run's own args.json after a failed --resume or --overwrite (so a bare
    --resume still takes the run's options), and no folder where there was none (nor the
    parents it created)."""
    run = tmp_path / "run"
    rc, _, err = _run([*FAST, "--out", run], capsys)
    assert rc == 0, err
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad_data = ["--data", tmp_path / "no_such_dir"]
    for extra in (["--resume", run], ["--out", run, "--overwrite"]):
        rc, _, err = _run([*bad_data, *extra], capsys)
        assert rc == 2 and "--data" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, extra
    rc, out, err = _run(["--resume", run], capsys)            # the run's own options again
    assert rc == 0 and "linear: finished in an earlier run" in out, (out, err)
    fresh = tmp_path / "fresh" / "deeper"
    for extra in (bad_data, ["--train-blocks", "3,99", "--method", "bsr"]):
        rc, _, err = _run([*FAST, *extra, "--out", fresh], capsys)
        assert rc == 2 and not fresh.parent.exists(), (extra, err)
    empty = tmp_path / "empty"                                 # a folder that was there stays
    empty.mkdir()
    rc, _, err = _run([*FAST, *bad_data, "--out", empty], capsys)
    assert rc == 2 and empty.is_dir() and not any(empty.iterdir()), err


def test_a_stop_after_a_checkpoint_was_rewritten_keeps_the_new_args_json(tmp_path, capsys,
                                                                          monkeypatch):
    """A resumed run stopped once it has rewritten a checkpoint (here Ctrl-C just after epoch
    2's, before the summary is written) keeps its own args.json, which describes that
    checkpoint: the next bare --resume continues with --epochs 3."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "linear" / "checkpoint.pt"

    def stop(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(cli, "write_history_csv", stop)
        rc, _, err = _run(["--resume", tmp_path, "--epochs", "3"], capsys)
    assert rc == 130, err
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert _strict_json(tmp_path / "args.json")["args"]["epochs"] == 3
    rc, out, err = _run(["--resume", tmp_path], capsys)
    assert rc == 0 and "after epoch 2" in out and "linear epoch 3/3" in out, out + err


def test_img_size_off_the_patch_grid_is_refused_before_training(tmp_path, capsys,
                                                                monkeypatch):
    """An --img-size that is not a whole number of patches (timm would drop the last pixels
    silently) is refused, naming it, before any training; too small for the digits too."""
    def no_training(*a, **k):
        raise AssertionError("trained before --img-size was checked")
    monkeypatch.setattr(cli, "fit", no_training)
    real_build_data = cli.build_data

    def data_after_the_check(*a, **k):   # the data's check reads every image: minutes
        if a[1] == 17:
            raise AssertionError("data read before --img-size was checked")
        return real_build_data(*a, **k)
    monkeypatch.setattr(cli, "build_data", data_after_the_check)
    from bsr_kernels.finetune.models import model_patch_size
    assert model_patch_size("vit_tiny_patch16_224") == (16, 16)
    assert model_patch_size("resnet18") is None   # not a ViT: build_model refuses it
    for size, says in ((17, "--img-size 17: not a whole number of"), (4, "--img-size 4")):
        rc, _, err = _run([*FAST, "--img-size", size, "--out", tmp_path / "run"], capsys)
        assert rc == 2 and says in err, err
        assert not (tmp_path / "run").exists()


def test_out_of_memory_is_an_error_message_not_a_traceback(monkeypatch, capsys):
    """An allocation failure (CPU allocator, CUDA, MemoryError) ends the run with exit status 2
    and a line that names it and what to lower; any other RuntimeError still propagates."""
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 35840000000000 bytes.")
    for error in (cpu, torch.OutOfMemoryError("CUDA out of memory."), MemoryError()):
        def boom(*a, _e=error, **k):
            raise _e
        monkeypatch.setattr(cli, "run", boom)
        rc, _, err = _run(FAST, capsys)
        assert rc == 2 and "out of memory" in err and "--batch-size" in err, (error, err)
    monkeypatch.setattr(cli, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(FAST)


def test_exit_status_names_each_kind_of_stop(tmp_path, capsys, monkeypatch):
    """Ctrl-C exits 130 with the hint that fits (--resume with --out, else that nothing was
    saved); a file that cannot be read is named; BSR_FINETUNE_DEBUG raises an error again, as
    a RuntimeError that is not an allocation failure (a defect) always is."""
    monkeypatch.delenv("BSR_FINETUNE_DEBUG", raising=False)

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(cli, "build_data", interrupt)
        for out, says in ((tmp_path / "run", "rerun with --resume to continue"),
                          (None, "nothing was saved (no --out)")):
            rc, _, err = _run([*FAST, *(["--out", out] if out else [])], capsys)
            assert rc == 130 and f"bsr-finetune: interrupted; {says}" in err, err
    denied = PermissionError(13, "Permission denied", "w.pt")
    assert cli.exit_status("p", denied, None) == 2
    assert capsys.readouterr().err == "p: error: w.pt: Permission denied\n"
    with pytest.raises(RuntimeError, match="a defect"):
        cli.exit_status("p", RuntimeError("a defect"), None)
    monkeypatch.setenv("BSR_FINETUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="--lr"):
        cli.exit_status("p", ValueError("--lr: for this test"), None)


def test_log_interval_prints_plain_step_lines_without_progress_bars(capsys):
    """Without progress bars (a log file) --log-interval N prints the step, loss and images/s
    every N steps, one plain line each; epoch lines end with the epoch's time; 0: none."""
    import re
    argv = [*FAST, "--batch-size", "64", "--log-interval", "3"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    steps = re.findall(r"^linear epoch 1/1 step (\d+)/(\d+): loss [\d.]+, [\d.]+ img/s$", out,
                       re.M)
    total = int(steps[0][1])
    assert [int(s) for s, _ in steps] == list(range(3, total, 3)) and "\r" not in out, out
    assert re.search(r"^linear epoch 1/1: train loss .*accuracy [\d.]+%, [\d.]+ s$", out, re.M)
    rc, out, err = _run([*argv, "--log-interval", "0"], capsys)
    assert rc == 0 and "epoch 1/1 step" not in out, out


def test_options_that_would_do_nothing_are_refused(capsys, monkeypatch):
    """BSR settings with methods that are not BSR, and --out settings without --out, are
    refused before anything loads, naming each option (timm and argparse habit: no option is
    silently ignored)."""
    _no_loading(monkeypatch)
    cases = [(["--method", "linear", "--keep-rate", "0.3", "--memory-mode", "fast"],
              "--keep-rate, --memory-mode: apply to --method bsr only"),
             (["--method", "full", "--activation-dtype", "bfloat16"],
              "--activation-dtype: applies to --method bsr only"),
             (["--method", "linear", "--train-blocks", "3"],
              "--train-blocks: applies to --method bsr only"),
             (["--overwrite"], "--overwrite: applies to a run written with --out DIR"),
             (["--save-every-steps", "5", "--overwrite"],
              "--overwrite, --save-every-steps: apply to a run written with --out DIR")]
    for extra, says in cases:
        rc, _, err = _run([*FAST, *extra], capsys)
        assert rc == 2 and says in err, (extra, err)
    # run() called without main() (no record of the options given): a block list set counts
    from bsr_kernels.finetune.distributed import DistInfo
    args = cli.build_parser().parse_args([*FAST, "--drop-at", "3"])
    with pytest.raises(ValueError, match="--drop-at: applies to --method bsr only"):
        cli.run(args, DistInfo())


def test_resume_with_fewer_methods_says_what_the_summary_leaves_out(tmp_path, capsys):
    """--resume with a --method list that leaves out methods of the run warns, naming them
    and the list that keeps them; their files stay."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    rc, _, err = _run(["--resume", tmp_path, "--method", "bitfit"], capsys)
    assert rc == 0, err
    assert ("also holds linear, which this run's summary and report leave out" in err
            and "--method bitfit,linear keeps them in" in err), err
    assert (tmp_path / "linear" / "result.json").is_file()


def test_resume_with_other_methods_does_not_count_the_runs_block_lists_as_given(tmp_path,
                                                                              capsys):
    """--resume of a BSR run started with --train-blocks and --drop-at, with --method linear: the
    block lists the run takes from its args.json are not options of this command line, so they
    are not refused as options of --method bsr only (they were; --keep-rate was not)."""
    bsr = ["--method", "bsr", *FAST[2:], "--train-blocks", "1", "--drop-at", "2",
           "--keep-rate", "0.7"]
    rc, _, err = _run([*bsr, "--out", tmp_path], capsys)
    assert rc == 0, err
    rc, out, err = _run(["--resume", tmp_path, "--method", "linear"], capsys)
    assert rc == 0 and "linear epoch 1/1" in out, out + err
    rc, _, err = _run(["--resume", tmp_path, "--method", "linear", "--drop-at", "1"], capsys)
    assert rc == 2 and "--drop-at: applies to --method bsr only" in err, err


def test_a_reused_method_is_measured_drawn_and_summarised_as_it_trained(tmp_path, capsys,
                                                                         monkeypatch):
    """--resume of a finished run reuses each method with its trained weights (the report and
    the measurements get those) and its epochs in summary.csv, which leaves out a method that
    --method leaves out; each method trains from the seed as if alone, so bitfit run after
    linear has the weights of bitfit run on its own."""
    two = ["--method", "linear,bitfit", *FAST[2:]]
    rc, _, err = _run([*two, "--out", tmp_path / "two"], capsys)
    assert rc == 0, err
    rc, _, err = _run([*two[:1], "bitfit", *two[2:], "--out", tmp_path / "one"], capsys)
    assert rc == 0, err
    state = {m: torch.load(tmp_path / "two" / m / "checkpoint.pt", weights_only=True)["model"]
             for m in ("linear", "bitfit")}
    alone = torch.load(tmp_path / "one" / "bitfit" / "checkpoint.pt", weights_only=True)
    assert_same(alone["model"], state["bitfit"])
    drawn = {}
    monkeypatch.setattr(cli, "_draw", lambda models, *a: drawn.update(models))
    for method, rows in ((None, ["linear", "bitfit"]), ("bitfit", ["bitfit"])):
        drawn.clear()
        rc, out, err = _run(["--resume", tmp_path / "two",
                             *(["--method", method] if method else [])], capsys)
        assert rc == 0 and "bitfit: finished in an earlier run" in out, out + err
        for m in rows:
            assert_same(drawn[m].state_dict(), state[m])
        with open(tmp_path / "two" / "summary.csv") as f:
            assert [(r["method"], r["epoch"]) for r in csv.DictReader(f)] == [
                (m, "1") for m in rows], method


def test_resume_without_the_checkpoint_of_a_finished_method_is_refused(tmp_path, capsys,
                                                                         monkeypatch):
    """--resume of a run whose finished method lost its checkpoint.pt (deleted to save space,
    result.json and the delta kept) is refused before anything loads, naming the missing file
    and the ways on, instead of training the method again from the start."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "linear" / "checkpoint.pt"
    ckpt.unlink()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        _no_loading(m)
        rc, _, err = _run(["--resume", tmp_path], capsys)
    assert rc == 2 and "checkpoint error" in err, err
    assert f"its checkpoint {ckpt} is missing" in err and "result.json" in err, err
    assert "--method" in err and f"delete {tmp_path / 'linear'}" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "linear" / "result.json").unlink()            # the delta alone: the same
    rc, _, err = _run(["--resume", tmp_path], capsys)
    assert rc == 2 and "delta.safetensors in" in err and not ckpt.exists(), err


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys, monkeypatch):
    """--resume of a folder that holds no run (a typo, an empty folder) is an error naming
    it, not a fresh run from scratch."""
    _no_loading(monkeypatch)
    (tmp_path / "empty").mkdir()
    for argv in (["--resume", tmp_path / "empty"], ["--resume", "--out", tmp_path / "empty"],
                 ["--resume", "--out", tmp_path / "missing"]):
        rc, _, err = _run([*FAST, *argv], capsys)
        assert rc == 2 and "no run to resume" in err, (argv, err)
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "missing").exists()


def test_resume_continues_the_run_as_it_was_started(tmp_path, capsys):
    """``--resume DIR`` alone takes the options the run was started with (its args.json): the
    same methods (not the demo's four), BSR settings and epochs; options given on the command
    line win, and a changed --epochs is said. args.json keeps the earlier command lines."""
    start = ["--method", "bsr", "--keep-rate", "0.75", "--epochs", "1", "--batch-size", "128",
             "--timing-rounds", "0", "--profile-batch", "2", "--samples", "0", "--no-progress"]
    rc, _, err = _run([*start, "--out", tmp_path], capsys)
    assert rc == 0, err
    rc, out, err = _run(["--resume", tmp_path], capsys)          # finished: nothing to train
    assert rc == 0, err
    assert "--resume: as the run was started: --method bsr --keep-rate 0.75 --epochs 1" in out
    assert "bsr: finished in an earlier run" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["bsr"]
    rc, out, err = _run(["--resume", tmp_path, "--epochs", "2"], capsys)   # trained further
    assert rc == 0, err
    assert "--epochs 2: the run was started for 1 epochs" in err
    state = torch.load(tmp_path / "bsr" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["fingerprint"]["keep_rate"] == 0.75
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["bsr"]
    record = _strict_json(tmp_path / "args.json")
    assert record["argv"] == ["--resume", str(tmp_path), "--epochs", "2"]
    assert record["earlier_argv"] == [[*start, "--out", str(tmp_path)],
                                      ["--resume", str(tmp_path)]]
    assert record["args"]["keep_rate"] == 0.75 and record["args"]["method"] == ["bsr"]
    # options that do not fit the checkpoint are refused, and args.json stays the run's
    before = (tmp_path / "args.json").read_bytes()
    rc, _, err = _run(["--resume", tmp_path, "--batch-size", "64"], capsys)
    assert rc == 2 and "checkpoint error" in err and "batch_size" in err, err
    assert (tmp_path / "args.json").read_bytes() == before


def test_a_moved_run_resumes_in_its_new_folder(tmp_path, capsys):
    """--resume DIR of a run folder renamed since it ran continues it there: where a run
    executes and its --overwrite (here of an empty folder) are not taken from its args.json."""
    rc, _, err = _run([*FAST, "--out", tmp_path / "a", "--overwrite"], capsys)
    assert rc == 0, err
    (tmp_path / "a").rename(tmp_path / "b")
    rc, out, err = _run(["--resume", tmp_path / "b", "--epochs", "2"], capsys)
    assert rc == 0, err
    assert "after epoch 1" in out and "--overwrite" not in err, out + err
    assert not (tmp_path / "a").exists()
    state = torch.load(tmp_path / "b" / "linear" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_a_finished_method_stopped_inside_a_later_epoch_is_not_reused(tmp_path, capsys,
                                                                        monkeypatch):
    """A finished run resumed for one more epoch and stopped inside it (its checkpoint saved
    every step) holds weights past its result.json: --resume with the finished --epochs again
    is refused naming that epoch, not reused as finished with those weights."""
    rc, _, err = _run([*FAST, "--out", tmp_path], capsys)
    assert rc == 0, err
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", _ctrl_c_at_call(train.train_step, 2)[0])
        rc, _, err = _run(["--resume", tmp_path, "--epochs", "2", "--save-every-steps", "1"],
                          capsys)
    assert rc == 130, err
    state = torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial_epoch"]["batches"] == 1
    assert (tmp_path / "linear" / "result.json").is_file()
    rc, out, err = _run(["--resume", tmp_path, "--epochs", "1"], capsys)
    assert rc == 2 and "was saved inside epoch 2" in err, out + err
    assert "finished in an earlier run" not in out


def test_resume_takes_the_default_bsr_blocks_given_explicitly(tmp_path, capsys):
    """A run with the default BSR blocks resumes with those blocks given explicitly (in any
    order): --resume compares the blocks as they resolve for the model (the digits ViT's 12
    blocks: --train-blocks 3,7,11, --drop-at 3,6,9), also for a finished method; other blocks
    are still refused, named."""
    bsr = ["--method", "bsr", *FAST[2:], "--out", tmp_path]
    rc, _, err = _run(bsr, capsys)
    assert rc == 0, err
    explicit = ["--train-blocks", "11,7,3", "--drop-at", "3,6,9"]
    rc, out, err = _run([*bsr, *explicit, "--resume"], capsys)      # finished: reused
    assert rc == 0 and "bsr: finished in an earlier run" in out, err
    rc, out, err = _run([*bsr, *explicit, "--epochs", "2", "--resume"], capsys)   # continued
    assert rc == 0 and "after epoch 1" in out and "bsr epoch 2/2" in out, err
    rc, _, err = _run([*bsr, "--train-blocks", "3,7", "--epochs", "2", "--resume"], capsys)
    assert rc == 2 and "train_blocks: checkpoint [11, 7, 3], now [3, 7]" in err, err
    assert "drop_at" not in err, err


def test_memory_mode_autograd(tmp_path, capsys, monkeypatch):
    """--memory-mode autograd (plain autograd through the blocks) trains BSR and is recorded;
    with --activation-dtype it is refused before anything loads (it would compress nothing)."""
    bsr = ["--method", "bsr", *FAST[2:], "--memory-mode", "autograd"]
    rc, _, err = _run([*bsr, "--out", tmp_path], capsys)
    assert rc == 0, err
    res = _strict_json(tmp_path / "bsr" / "result.json")
    assert res["memory_mode"] == "autograd" and res["trainable_params"] > 0
    _no_loading(monkeypatch)
    rc, _, err = _run([*bsr, "--activation-dtype", "bfloat16"], capsys)
    assert rc == 2 and "--activation-dtype" in err and "--memory-mode autograd" in err, err


def test_memory_mode_auto_is_lean_on_cpu_and_autograd_on_cuda(tmp_path, capsys):
    """--memory-mode auto (the default) trains lean on CPU, and records the mode it ran;
    on CUDA it stands for autograd, except with --activation-dtype (which autograd refuses)."""
    from bsr_kernels.finetune.train import resolve_memory_mode
    rc, _, err = _run(["--method", "bsr", *FAST[2:], "--out", tmp_path], capsys)
    assert rc == 0, err
    assert _strict_json(tmp_path / "bsr" / "result.json")["memory_mode"] == "lean"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_memory_mode("auto", cuda) == "autograd"
    assert resolve_memory_mode("auto", cuda, torch.bfloat16) == "lean"
    assert resolve_memory_mode("auto", cpu) == "lean"
    assert [resolve_memory_mode(m, cuda) for m in ("lean", "fast", "autograd")] == [
        "lean", "fast", "autograd"]
    with pytest.raises(ValueError, match="--memory-mode must be one of auto, lean"):
        resolve_memory_mode("eager", cpu)


def test_memory_mode_auto_resumes_as_auto(tmp_path, capsys, monkeypatch):
    """args.json keeps --memory-mode as given (auto), so a resumed run resolves it on its own
    device; a run from before auto, whose args.json holds the old default lean although the
    option was not given, resumes with auto too; a finished BSR reused on resume is labelled
    with the mode its figures are measured in now."""
    from bsr_kernels.finetune import train as train_mod
    run = tmp_path / "run"
    rc, _, err = _run(["--method", "bsr", *FAST[2:], "--out", run], capsys)
    assert rc == 0, err
    args_json = run / "args.json"
    assert json.loads(args_json.read_text())["args"]["memory_mode"] == "auto"
    # resumed "on CUDA": auto resolves there, to autograd (nothing taken from args.json)
    seen = []
    real = train_mod.resolve_memory_mode

    def on_cuda(mode, device, activation_dtype=None):
        seen.append(mode)
        return real(mode, torch.device("cuda"), activation_dtype)
    monkeypatch.setattr(cli, "resolve_memory_mode", on_cuda)
    rc, out, err = _run(["--resume", run], capsys)
    assert rc == 0 and seen == ["auto"] and "--memory-mode" not in out, out + err
    res = _strict_json(run / "summary.json")["methods"]["bsr"]
    assert res["memory_mode"] == "autograd"   # reused, measured again in autograd mode
    # an args.json written before auto: memory_mode "lean" stored though not given
    record = json.loads(args_json.read_text())
    record["args"]["memory_mode"] = "lean"
    args_json.write_text(json.dumps(record))
    seen.clear()
    rc, out, err = _run(["--resume", run], capsys)
    assert rc == 0 and seen == ["auto"] and "--memory-mode" not in out, out + err
    # an explicit choice is the run's own and is taken
    explicit = tmp_path / "explicit"
    rc, _, err = _run(["--method", "bsr", *FAST[2:], "--memory-mode", "fast", "--out",
                       explicit], capsys)
    assert rc == 0, err
    for _ in range(2):   # a second resume still knows the mode was chosen, not defaulted
        seen.clear()
        rc, out, err = _run(["--resume", explicit], capsys)
        assert rc == 0 and seen == ["fast"] and "--memory-mode fast" in out, out + err


def test_given_options_tells_given_options_from_defaults():
    """What --resume leaves to the earlier run: the options argv does not give, also for a value
    equal to the default and for repeated (append) options."""
    from bsr_kernels.finetune import multitask
    assert cli.given_options(cli.build_parser(), ["--resume", "d", "--keep-rate", "0.5",
                                                  "--no-progress"]) == ["keep_rate", "progress",
                                                                        "resume"]
    mt = multitask.build_parser()
    assert cli.given_options(mt, ["--task", "a=b", "--task", "c=d"]) == ["task"]
    assert cli.given_options(mt, []) == []


def test_pretrained_and_checkpoint_are_refused_together(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    rc, _, err = _run([*FAST, "--pretrained", "--checkpoint", tmp_path / "w.safetensors"],
                      capsys)
    assert rc == 2 and "--pretrained and --checkpoint" in err, err


def test_torchcompile_trains_through_torch_compile(tmp_path, capsys, monkeypatch):
    """The plumbing only (compiling takes about a minute here); tests/test_modes.py checks that
    compiled BSR equals eager."""
    compiled, modes = [], []

    def fake_compile(model, *args, mode=None, **kwargs):
        compiled.append(model)
        modes.append(mode)
        return model
    monkeypatch.setattr(torch, "compile", fake_compile)
    rc, _, err = _run([*FAST, "--torchcompile", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert len(compiled) == 1 and modes == [None]   # torch's default mode
    state = torch.load(tmp_path / "linear" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])


def test_torchcompile_mode_reaches_torch_compile(tmp_path, capsys, monkeypatch):
    """--torchcompile-mode is torch.compile's mode (timm's flag); alone it is refused, naming
    --torchcompile, before anything is written; an unknown mode is refused by the parser, and
    by fit() (FitOptions.compile_mode, named) when called directly."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    rc, _, err = _run([*FAST, "--torchcompile", "--torchcompile-mode", "reduce-overhead",
                       "--out", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert modes == ["reduce-overhead"]
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["args"]["torchcompile_mode"] == "reduce-overhead"
    rc, _, err = _run([*FAST, "--torchcompile-mode", "max-autotune", "--out", tmp_path / "no"],
                      capsys)
    assert rc == 2 and "--torchcompile-mode max-autotune" in err and "add --torchcompile" in err
    assert not (tmp_path / "no").exists()
    with pytest.raises(SystemExit):
        _run([*FAST, "--torchcompile", "--torchcompile-mode", "fastest"], capsys)
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    from bsr_kernels.finetune.train import DistInfo, FitOptions, fit
    with pytest.raises(ValueError, match="compile_mode must be None or one of default, "):
        fit(None, None, FitOptions(compile=True, compile_mode="fastest"), DistInfo())


def _assert_same_checkpoint(a, b):
    """Two training checkpoints hold the same training: epoch, step, weights, the whole
    optimizer state (every tensor of every parameter, and the param groups), scheduler, history
    and RNG state."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["model"] and a["optimizer"]["state"]
    for key in ("model", "optimizer", "scheduler", "history", "rng"):
        assert_same(a[key], b[key], key)


def test_sched_timm_schedules_resume_exactly(tmp_path, capsys):
    """--sched step: timm's scheduler, stepped per update, saved and restored with the
    checkpoint (an extended resume continues its schedule)."""
    args = ["--method", "linear", "--batch-size", "128", "--timing-rounds", "0",
            "--profile-batch", "2", "--samples", "0", "--no-progress", "--sched", "step"]
    rc, _, err = _run([*args, "--epochs", "3", "--out", tmp_path / "whole"], capsys)
    assert rc == 0, err
    rc, _, err = _run([*args, "--epochs", "2", "--out", tmp_path / "parts"], capsys)
    assert rc == 0, err
    rc, _, err = _run([*args, "--epochs", "3", "--resume", tmp_path / "parts"], capsys)
    assert rc == 0, err
    a, b = (torch.load(tmp_path / d / "linear" / "checkpoint.pt", weights_only=True)
            for d in ("whole", "parts"))
    assert a["fingerprint"]["sched"] == "step"
    assert a["scheduler"]["num_updates"] == b["scheduler"]["num_updates"] == 12
    lrs = [h["lr"] for h in a["history"]]
    assert len(lrs) == 3 and lrs[0] > lrs[1] > lrs[2] > 0   # x0.1 once per epoch (3 epochs / 3)
    assert lrs[1] == pytest.approx(lrs[0] * 0.1) and lrs[2] == pytest.approx(lrs[0] * 0.01)
    # the 2-epoch schedule also decays once per epoch (2 // 3 -> 1), so extending it to 3
    # epochs continues it into the 3-epoch schedule: the resumed run is the uninterrupted one
    assert [h["lr"] for h in b["history"]] == lrs
    _assert_same_checkpoint(a, b)
    with pytest.raises(SystemExit):
        cli.main(["--sched", "plateau", *FAST])
    assert "--sched" in capsys.readouterr().err


def test_memory_and_flops_are_measured_in_training_mode(capsys, monkeypatch):
    """bsr-finetune profiles a training step: the models are in training mode (evaluation had
    left them in eval mode), whatever the method."""
    prof_mod = importlib.import_module("bsr_kernels.profile")  # bsr_kernels.profile: a function
    modes, real = [], prof_mod.profile

    def spy(model, *args, **kwargs):
        modes.append(model.training)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(prof_mod, "profile", spy)
    rc, _, err = _run(["--method", "linear,bsr", *FAST[2:]], capsys)
    assert rc == 0, err
    assert modes == [True, True]
