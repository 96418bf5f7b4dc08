"""Run records: one JSON file per run, strict (always valid JSON) and written atomically.

Layout: `results/<benchmark>/<model>/<method>/<run_id>.json` (the id: `foca_bench.identity`). Tables are derived
from these files only. A non-finite number never reaches a record: it is written as null and named in the record's
`faults` list (`finite`), and the run exits non-zero.
"""

import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from foca_bench import REPO_DIR
from foca_bench.errors import CorruptFileError

log = logging.getLogger("foca_bench")

PACKAGES = ("torch", "torchvision", "diffusers", "hydra-core", "omegaconf", "torchmetrics", "torch-fidelity",
            "numpy", "safetensors", "scikit-learn")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "git_commit": git_commit()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file unique to this call in the same directory, then `os.replace` it into
    place: no reader ever sees a half-written file and concurrent writers never share a temporary file. The file
    gets the permissions of a plainly created one (0644 under the usual umask 022), not `mkstemp`'s 0600, so
    teammates can read a shared results folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(node: Any, where: str = "") -> tuple[Any, list[dict]]:
    """`node` with every non-finite float replaced by None, and one fault `{"field": dotted key, "value": "nan"}`
    per replaced value (JSON has no NaN or infinity: `json.loads` of strict parsers rejects them)."""
    if isinstance(node, float) and not math.isfinite(node):
        return None, [{"field": where, "value": str(node)}]
    faults: list[dict] = []
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out[k], found = finite(v, f"{where}.{k}" if where else str(k))
            faults += found
        return out, faults
    if isinstance(node, (list, tuple)):
        items = [finite(v, f"{where}.{i}") for i, v in enumerate(node)]
        return [v for v, _ in items], [f for _, found in items for f in found]
    return node, faults


def atomic_write_json(path: Path, payload: dict) -> None:
    """A JSON file, written (and fsynced) atomically; a non-finite float is an error (see `finite`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_calibration(stem: str, method: str, knob: str, values: list[float], fmt: str, result: dict,
                      headline: str) -> Path:
    """Writes a calibration command's result to `results/calibration/<stem>_<model>.json` and prints it with the
    contents of `conf/model_method/<model>_<method>.yaml` that set `method`'s `cache.<knob>` to `values`."""
    model = result["model"]
    out = Path("results/calibration") / f"{stem}_{model}.json"
    atomic_write_json(out, result)
    print(f"{headline} (written to {out}). For conf/model_method/{model}_{method}.yaml:\n")
    print(f"# @package cache\n{knob}: [" + ", ".join(format(v, fmt) for v in values) + "]")
    return out


def read_record(path: Path) -> dict:
    """A record written before (this run's cell is done). Records are written atomically, so an unreadable one was
    damaged afterwards: `CorruptFileError` names it (force=true recomputes and replaces it)."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        return record
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(path, "The record of this cell", err, "Delete it, or rerun with force=true to "
                               "compute the cell again and replace it.") from err


def record_path(results_dir: Path, benchmark: str, model: str, method: str, rid: str) -> Path:
    return Path(results_dir) / benchmark / model / method / f"{rid}.json"


NOT_RECORDS = ("cache", "hydra", "paper", "samples", "traces", "tables", "figures", "wandb", "calibration")


def record_files(results_dir: Path) -> list[Path]:
    """Every record file under `results_dir` (not caches, samples, Hydra outputs or the paper's reference data)."""
    return [p for p in sorted(Path(results_dir).glob("*/*/*/*.json")) if p.parts[-4] not in NOT_RECORDS]


CLAIM_TIMEOUT_S = 600.0  # `claim_timeout_s`: a claim whose heartbeat is older than this is taken over


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_file(path: Path) -> Path:
    """The lock file of the work whose result is `path`: `.<stem>.lock` beside it."""
    return path.with_name(f".{path.stem}.lock")


def describe_claim(holder: dict, clock: Callable[[], float] = time.time) -> str:
    """`<lock> (host h, pid p, started ..., last beat n s ago)`, for every message about a claim."""
    beat = holder.get("beat")
    ago = f"{clock() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"{holder.get('lock', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{when}, last beat {ago})")


def _read_claim(lock: Path) -> Optional[dict]:
    """The holder a lock file names, None when the file is gone; an unreadable file reads as a holder without a
    beat, whose age is the file's (a lock is written whole by `os.link`, so only outside damage makes one)."""
    try:
        text = lock.read_text()
        mtime = lock.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        holder = {"unreadable": True}
    holder.setdefault("beat", mtime)
    return {**holder, "lock": str(lock)}


def _write_claim(lock: Path, me: dict, replace: bool) -> bool:
    """Writes `me` to `lock` whole: to a temporary file, then linked into place (fails if `lock` exists: the
    exclusive create, atomic on local filesystems and NFS) or, for a heartbeat, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f"{lock.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        if replace:
            os.replace(tmp, lock)
            return True
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _stale(holder: dict, me: dict, timeout_s: float, now: float) -> Optional[str]:
    """Why `holder`'s claim may be taken over, or None while it is live."""
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        return "its process is gone"
    if now - holder["beat"] > timeout_s:
        return f"no heartbeat for {now - holder['beat']:.0f} s (claim_timeout_s={timeout_s:g})"
    return None


def _take_over(lock: Path, holder: dict) -> bool:
    """Removes the stale lock `holder` was read from, unless another job replaced it meanwhile: the lock is
    renamed aside (one process wins the rename), and put back if what was renamed is not the stale holder's."""
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True  # its holder released it meanwhile
    moved = _read_claim(aside) or {}
    if moved.get("token") != holder.get("token") or moved.get("beat") != holder.get("beat"):
        try:
            os.link(aside, lock)  # a fresh claim of another job: put it back, unless a third job claimed since
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


class _Heartbeat(threading.Thread):
    """Rewrites the claim's `beat` every `every` seconds while its work runs; stops when the claim was taken over
    (the lock names another token), saying so once."""

    def __init__(self, lock: Path, me: dict, every: float, clock: Callable[[], float]) -> None:
        super().__init__(name=f"claim heartbeat {lock.name}", daemon=True)
        self.lock, self.me, self.every, self.clock = lock, me, every, clock
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            current = _read_claim(self.lock)
            if current is None and _write_claim(self.lock, {**self.me, "beat": self.clock()}, replace=False):
                continue  # moved aside by a job checking whether it is stale, and not put back yet: claimed again
            if current is None or current.get("token") != self.me["token"]:
                log.warning(f"The claim {self.lock} was taken over by another job"
                            f"{' ' + describe_claim(current, self.clock) if current else ''}; this job continues, "
                            "and the last to finish writes the result.")
                return
            _write_claim(self.lock, {**self.me, "beat": self.clock()}, replace=True)


class Terminated(SystemExit):
    """SIGTERM (SLURM preemption, `timeout`, `kill`) while a claim is held: raised in the main thread so that
    every `finally` runs (the claim is released, temporary files removed) before the process exits."""


@contextmanager
def _release_on_signals() -> Iterator[None]:
    """SIGTERM raises `Terminated` (exit status 143) for the duration, instead of killing the process on the spot;
    SIGINT raises KeyboardInterrupt as usual (also where it was reset to the default action). Only the main
    thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def claim(path: Path, timeout_s: float = CLAIM_TIMEOUT_S, force: bool = False,
          clock: Callable[[], float] = time.time, beat_every_s: Optional[float] = None) -> Iterator[Optional[dict]]:
    """Claims the work whose result is `path` among concurrent jobs (processes or hosts sharing the filesystem)
    with a lock file beside it (`claim_file`) holding the owner's host, pid, start time and last heartbeat.

    While the claim is held, a thread refreshes the heartbeat every `beat_every_s` (default: a quarter of
    `timeout_s`), and SIGTERM or SIGINT unwinds the job, releasing the claim. A claim is taken over when its
    process is gone (same host), when its heartbeat is older than `timeout_s` (any host: a job killed with SIGKILL
    or a node that died), or when `force` is set (the other job is not stopped; both compute, the last result
    written wins).

    Args:
        clock: the time source of heartbeats and their ages (tests pass a fake clock).

    Yields:
        None when this process holds the claim (released on exit, also on error or a signal), else the holder:
        {"host", "pid", "started", "beat", "lock"}, which `describe_claim` puts into words.
    """
    lock = claim_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    now = clock()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": now, "beat": now}
    holder: Optional[dict] = None
    for _ in range(3):
        if _write_claim(lock, me, replace=False):
            break
        holder = _read_claim(lock)
        if holder is None:
            continue  # released meanwhile: try again
        why = "force=true" if force else _stale(holder, me, timeout_s, clock())
        if why is None:
            yield holder
            return
        log.warning(f"Taking over the claim {describe_claim(holder, clock)}: {why}")
        _take_over(lock, holder)
    else:
        yield holder or {"lock": str(lock)}  # lost every race for it: another job holds it now
        return
    heartbeat = _Heartbeat(lock, me, beat_every_s or timeout_s / 4, clock)
    heartbeat.start()
    try:
        with _release_on_signals():
            yield None
    finally:
        heartbeat.stop.set()
        heartbeat.join()
        current = _read_claim(lock)
        if current is not None and current.get("token") == me["token"]:
            lock.unlink(missing_ok=True)
