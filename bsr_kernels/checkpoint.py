"""The one way bsr_kernels writes files: atomically, with ordinary permissions, strict JSON.

Every file the library and ``bsr-finetune`` write (training checkpoints, delta checkpoints and
their JSON sidecars, ``result.json``, ``summary.json``, ``summary.csv``, ``args.json``, the
report picture) goes through :func:`atomic_write`:

* the bytes go to a temporary file ``.<name>.tmp<PID>`` in the target's folder, flushed and
  fsync'ed, then renamed over the target: a crash (even SIGKILL) leaves either the old file or the
  new one, never a torn one;
* the new file gets the mode an ordinary ``open(path, "w")`` would give: an existing file's own
  permission bits (a checkpoint made private with ``chmod 600`` stays private), else ``0o666``
  less the umask, whatever the writer used for its temporary file (safetensors writes
  ``0o600``);
* a temporary file left by a process that was killed mid-write is recognised by its name and
  removed by :func:`clean_orphans` (``bsr-finetune`` calls it on start).

Formats are versioned: a JSON document written by :func:`write_json` with ``format=...`` carries
``"format"`` and ``"version"`` keys, and :func:`read_json` checks them and names the file and
the fix when it is damaged or of another version. JSON is strict: NaN and infinities become
``null`` (Python's ``json`` would write a bare ``NaN``, which is not JSON).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

__all__ = ["atomic_write", "write_json", "read_json", "to_strict_json", "clean_orphans",
           "tmp_name", "load_torch_file", "DamagedFileError", "RunLock", "RunLockedError"]

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
# os.replace, reached through a module global so that tests can interrupt a write right before
# the rename (a kill mid-write); production code never changes it.
_replace = os.replace


class DamagedFileError(ValueError):
    """A file that exists but cannot be read back (torn, truncated, hand-edited, other version)."""


def tmp_name(path: Union[str, os.PathLike]) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _umask_by_setting() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


#: The umask when this module was imported: where ``/proc`` cannot tell the current one.
_IMPORT_UMASK = _umask_by_setting()


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (Linux 4.7 and later). Reading it
    with ``os.umask`` means setting it to 0 for a moment, which gives the files that other
    threads create meanwhile mode 0o666 (a data loader's, a logger's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _file_mode() -> int:
    """A new file's mode: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def atomic_write(path: Union[str, os.PathLike],
                 data: Union[bytes, str, Callable[[Path], None]]) -> Path:
    """Writes ``path`` atomically (temporary file in the same folder, fsync, rename).

    Args:
        path: the file to write; its folder is created if needed.
        data: the bytes or text (UTF-8) to write, or a callable ``writer(tmp_path)`` that writes
            the temporary file itself (for libraries that only write to a path, like
            safetensors or matplotlib).

    Returns:
        ``path``.

    Raises:
        OSError: if the folder cannot be created or written; the temporary file is removed and
            an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        try:   # open(path, "w") keeps an existing file's mode: a chmod 600 one stays private
            mode = os.stat(path).st_mode & 0o777
        except OSError:   # no such file: a new one's
            mode = _file_mode()
        os.chmod(tmp, mode)
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:   # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_torch_file(path: Union[str, os.PathLike]) -> Any:
    """``torch.load(path)`` on CPU with ``weights_only=True``, which also allows
    ``argparse.Namespace``: the ``args`` that timm's train.py saves beside the weights (timm's
    own loader allows it too). Other objects are refused as ``weights_only`` refuses them."""
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, tensors and numpy arrays by lists,
    paths by strings, tuples by lists: something ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_strict_json(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if callable(getattr(obj, "tolist", None)):   # numpy arrays and scalars, as tensors
        return to_strict_json(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):   # other scalars
        return to_strict_json(obj.item())
    return obj


def write_json(path: Union[str, os.PathLike], obj: dict, format: Optional[str] = None,
               version: Optional[int] = None) -> Path:
    """Writes ``obj`` as strict, indented JSON, atomically.

    Args:
        path: the file.
        obj: a JSON-able dict (NaN/inf become null, see :func:`to_strict_json`).
        format, version: stamped into the document as ``"format"`` and ``"version"`` (first
            keys) when given, for :func:`read_json` to check.
    """
    doc = {}
    if format is not None:
        doc["format"] = format
        doc["version"] = version
    doc.update(obj)
    text = json.dumps(to_strict_json(doc), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, text)


def read_json(path: Union[str, os.PathLike], what: str, fix: str,
              format: Optional[str] = None, versions: Iterable[int] = ()) -> dict:
    """Reads a JSON object written by :func:`write_json`.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. "the result of method bsr").
        fix: what the user should do when it is damaged (completes the message).
        format, versions: the expected ``"format"`` and accepted ``"version"`` values, when the
            file is versioned.

    Raises:
        DamagedFileError: naming ``path``, ``what`` is wrong with it and ``fix``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text, parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedFileError(f"{path} ({what}) is damaged or unreadable "
                               f"({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} ({what}) is damaged: it holds a JSON "
                               f"{type(obj).__name__}, not an object; {fix}")
    if format is not None:
        versions = tuple(versions)
        if obj.get("format") != format or obj.get("version") not in versions:
            raise DamagedFileError(
                f"{path} ({what}) has format {obj.get('format')!r} version "
                f"{obj.get('version')!r}; this bsr_kernels reads {format!r} version "
                f"{' or '.join(map(str, versions))}; {fix}")
    return obj


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def clean_orphans(folder: Union[str, os.PathLike], recursive: bool = True) -> list:
    """Removes the temporary files of :func:`atomic_write` left by processes that died mid-write.

    A file named ``.<name>.tmp<PID>`` is removed when no process ``PID`` is alive (or it is this
    process's own, which cannot be in the middle of a write when this runs).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    files = folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*")
    for p in sorted(files):
        m = _TMP_RE.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    except OverflowError:
        return False
    return True


def _hostname() -> str:
    import socket
    return socket.gethostname() or "-"


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


#: The lock files that a RunLock of this process holds (real paths): a second RunLock of the
#: same folder in this process is refused, as another process's would be.
_HELD: set = set()


class RunLockedError(ValueError):
    """An output folder that another live process is writing."""


class RunLock:
    """A lock file (``<folder>/.lock``) for one writer per folder.

    The lock is taken with ``O_CREAT | O_EXCL`` and holds the owner's PID, the process's start
    time (from ``/proc``, where there is one) and the host name. A lock of this host whose
    process is gone, or whose PID now belongs to a process started at another time (PID
    reuse), is stale and is taken over; so is one naming this process that none of its
    RunLocks holds (a container's recurring PID), while a second RunLock of a folder that one of
    this process holds is refused. A lock of another host (a shared file system) is
    respected, as its process cannot be checked from here, also once that run has ended (a
    SLURM job requeued on another node); the message says to delete it if that run is no
    longer running.

    Taking over is safe when several processes find the same stale lock: each takes an
    exclusive ``flock`` of the stale file (without waiting), checks again that it is still the
    file at ``.lock`` and still stale, and only then renames its own lock over it
    (:func:`atomic_write`). So one process wins; the others find the flock taken, or another
    file at ``.lock`` (the winner's, whose live process they then respect). (Deleting the stale
    file and creating a new one let a second process delete the first one's new lock, and both
    wrote the folder.) A ``flock`` ends with its process, so a takeover that dies leaves nothing
    that blocks the next one.

    Raises (on :meth:`acquire`):
        RunLockedError: when a live process holds the lock, or another process is taking over
            the stale lock at the same moment.
        OSError: when the folder cannot be written.
    """

    NAME = ".lock"

    def __init__(self, folder: Union[str, os.PathLike], what: str = "--out"):
        self.path = Path(folder) / self.NAME
        self.what = what
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = f"{os.getpid()} {_start_time(os.getpid()) or '-'} {_hostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _file_mode())
            except FileExistsError:
                self._refuse_if_live()
                if self._take_over(mine):
                    return self._hold()
                continue   # the lock file went away or was replaced: look again
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            return self._hold()
        raise RunLockedError(f"{self.what} {self.path.parent}: could not take the lock file "
                             f"{self.path} (other processes keep taking it)")

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _hold(self) -> "RunLock":
        self.held = True
        _HELD.add(self._key())
        return self

    def _refuse_if_live(self) -> None:
        """RunLockedError when the lock file names a live process (or one creating it now)."""
        pid, started, host = self._owner()
        if pid is None and self._age() < 5.0:   # being created right now
            pid = -1
        other_host = host is not None and host != _hostname()
        if other_host:
            live = True
        elif pid == os.getpid():   # this process: live if one of its RunLocks holds it, else
            live = self._key() in _HELD   # a leftover (a container's PID, a lock not released)
        else:
            live = pid is not None and _pid_alive(pid) and (
                started is None or _start_time(pid) in (None, started))
        if pid == -1 or live:
            who = ("this process, through another RunLock" if pid == os.getpid()
                   else f"process {pid}" + (f" on {host}" if other_host else "") if pid > 0
                   else "a process starting now")
            unless = ("that run is no longer running (a lock of another host is never taken "
                      "over: its process cannot be checked from here)" if other_host
                      else "that process is not bsr-finetune")
            raise RunLockedError(
                f"{self.what} {self.path.parent}: another bsr-finetune ({who}) is "
                f"writing there (lock file {self.path}); wait for it to finish, use "
                f"another folder, or delete the lock file if {unless}") from None

    def _take_over(self, content: str) -> bool:
        """Replaces the stale lock file by one holding ``content``, under an exclusive
        ``flock`` of the stale file (see the class docstring). False when the file at the path
        went away or is another one by the time the flock is held (the caller looks again);
        RunLockedError when another process holds the flock or the lock is live now."""
        import fcntl

        try:
            try:
                fd = os.open(self.path, os.O_RDWR)   # NFS's flock needs a writable file
            except PermissionError:
                fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(
                    f"{self.what} {self.path.parent}: another process is taking over the stale "
                    f"lock file {self.path} right now; wait for it to finish or use another "
                    "folder") from None
            except OSError as e:
                raise RunLockedError(
                    f"{self.what} {self.path.parent}: the lock file {self.path} is stale (its "
                    f"process is gone), but this file system cannot lock it for a safe "
                    f"takeover ({e}); delete it if no other bsr-finetune writes there") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                return False
            self._refuse_if_live()   # checked again: it may have changed before the flock
            atomic_write(self.path, content)
            return True
        finally:
            os.close(fd)   # ends the flock

    def _age(self) -> float:
        import time
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _owner(self) -> tuple:
        """(pid, start time, host) of the lock's owner; None for what cannot be read."""
        try:
            fields = self.path.read_text().split()
        except OSError:
            fields = []
        try:
            pid = int(fields[0])
        except (ValueError, IndexError):
            return None, None, None
        started = fields[1] if len(fields) > 1 and fields[1] != "-" else None
        host = fields[2] if len(fields) > 2 else None
        return pid, started, host

    def release(self) -> None:
        if self.held:
            self.held = False
            _HELD.discard(self._key())
            if self._owner()[0] == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
