"""Run records: one JSON file per run, written atomically; identity is a hash of the resolved config.

Layout: `results/<benchmark>/<model>/<method>/<run_id>.json`. Tables are derived from these files only.
"""

import hashlib
import json
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
# Keys that say where things are, not what was computed: excluded from a run's identity.
PATH_KEYS = {"path", "results_dir", "force", "device", "logger"}


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if k not in PATH_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def run_id(config: dict) -> str:
    """Short hash of the resolved config with paths removed."""
    blob = json.dumps(_strip(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file unique to this call in the same directory, then `os.replace` it into
    place: no reader ever sees a half-written file and concurrent writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: dict) -> None:
    """A JSON file, written (and fsynced) atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_calibration(stem: str, method: str, knob: str, values: list[float], fmt: str, result: dict,
                      headline: str) -> Path:
    """Writes a calibration command's result to `results/calibration/<stem>_<model>.json` and prints it with the
    `method_defaults` snippet for `conf/model/<model>.yaml` that sets `method`'s `cache.<knob>` to `values`."""
    model = result["model"]
    out = Path("results/calibration") / f"{stem}_{model}.json"
    atomic_write_json(out, result)
    print(f"{headline} (written to {out}). For conf/model/{model}.yaml:\n")
    print(f"method_defaults:\n  {method}:\n    {knob}: [" + ", ".join(format(v, fmt) for v in values) + "]")
    return out


def record_path(results_dir: Path, benchmark: str, model: str, method: str, rid: str) -> Path:
    return Path(results_dir) / benchmark / model / method / f"{rid}.json"


def iter_records(results_dir: Path) -> Iterator[tuple[Path, dict]]:
    """Every record under `results_dir` (skips caches, Hydra outputs and the paper's reference data)."""
    for path in sorted(Path(results_dir).glob("*/*/*/*.json")):
        if path.parts[-4] in ("cache", "hydra", "paper", "traces", "tables", "figures", "wandb"):
            continue
        with open(path) as f:
            yield path, json.load(f)


def group_records(results_dir: Path) -> dict[tuple[str, str], list[tuple[Path, dict]]]:
    """Every record under `results_dir` by (benchmark, model): the unit of a table and of a figure."""
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for path, rec in iter_records(results_dir):
        groups.setdefault((rec["benchmark"], rec["model"]), []).append((path, rec))
    return dict(sorted(groups.items()))


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
