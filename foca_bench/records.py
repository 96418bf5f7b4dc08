"""Run records: one JSON file per run, strict (always valid JSON) and written atomically.

Layout: `results/<benchmark>/<model>/<method>/<run_id>.json` (the id: `foca_bench.identity`). Tables are derived
from these files only. A non-finite number never reaches a record: it is written as null and named in the record's
`faults` list (`finite`), and the run exits non-zero.
"""

import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from foca_bench import REPO_DIR

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


def record_path(results_dir: Path, benchmark: str, model: str, method: str, rid: str) -> Path:
    return Path(results_dir) / benchmark / model / method / f"{rid}.json"


NOT_RECORDS = ("cache", "hydra", "paper", "samples", "traces", "tables", "figures", "wandb", "calibration")


def record_files(results_dir: Path) -> list[Path]:
    """Every record file under `results_dir` (not caches, samples, Hydra outputs or the paper's reference data)."""
    return [p for p in sorted(Path(results_dir).glob("*/*/*/*.json")) if p.parts[-4] not in NOT_RECORDS]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def claim(path: Path) -> Iterator[Optional[dict]]:
    """Claims the computation of the record at `path` among concurrent jobs (processes or hosts sharing the
    filesystem), with an exclusive-create lock file next to it.

    Yields:
        None when this process holds the claim (the lock is removed on exit, also on error), else the holder's
        {"host", "pid", "started"}. A lock left by a dead process of this host is taken over; one from another
        host is respected (remove `.<run_id>.lock` by hand if its job is gone).
    """
    lock = path.with_name(f".{path.stem}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            stale = holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))
            if stale:
                lock.unlink(missing_ok=True)
                continue
            yield holder or {"host": "?", "pid": "?", "started": None}
            return
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield None
        finally:
            lock.unlink(missing_ok=True)
        return
    yield {"host": "?", "pid": "?", "started": None}  # lost a race for a stale lock twice: let the winner run
