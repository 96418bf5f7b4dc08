"""`-m` sweeps run every cell: a failing cell is reported at the end instead of stopping the sweep.

Hydra's launchers call the task function once per cell (`hydra.core.utils.run_job`). In a multirun, `run.py`
turns a failing cell into a return value (`failed`), so the launcher goes on with the next cell, and this
callback (`hydra.callbacks.sweep_report` in `conf/config.yaml`) notes every cell's outcome in
`<sweep dir>/.cells/<job>.json` as it ends (on the node that ran it, for the SLURM launcher), then, once every cell
has returned, lists the failed and skipped cells with their overrides and reasons and exits with status 1 if any
failed. A cell whose overrides do not compose (a wrong type, an unknown key) is refused by Hydra before any cell
runs, with its message.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("foca_bench")


def failed(reason: str) -> dict:
    """What `run.py` returns for a cell that failed in a multirun."""
    return {"failed": reason}


def outcome(job_return: JobReturn) -> tuple[str, Optional[str]]:
    """(status, reason) of a finished cell: `failed`, `skipped` (another job holds its claim), `pending` (its shard
    is done, other shards are not) or `done` (its record is on disk)."""
    if job_return.status == JobStatus.FAILED:
        error = job_return._return_value
        return "failed", f"{type(error).__name__}: {error}"
    value: Any = job_return.return_value
    if isinstance(value, dict):
        for status in ("failed", "skipped", "pending"):
            if value.get(status):
                return status, str(value[status]) if status != "pending" else f"{value['pending']} samples of " \
                    "other shards missing"
    return "done", None


class SweepReport(Callback):
    """Notes each cell's outcome as it ends and lists the failed and skipped ones when the sweep ends."""

    def __init__(self) -> None:
        self.folder: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.folder = Path(str(config.hydra.sweep.dir)) / ".cells"
        for old in self.folder.glob("*.json"):  # a rerun into the same sweep folder reports only its own cells
            old.unlink()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.folder is None:  # a single run: run.py reports it
            return
        status, reason = outcome(job_return)
        self.folder.mkdir(parents=True, exist_ok=True)
        num = config.hydra.job.num
        (self.folder / f"{num:05d}.json").write_text(json.dumps(
            {"job": num, "overrides": list(job_return.overrides or []), "status": status, "reason": reason}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        cells = [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))] if self.folder else []
        counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "pending", "skipped", "failed")}
        lines = [f"Sweep: {len(cells)} cells, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
        for cell in cells:
            if cell["status"] in ("failed", "skipped"):
                lines.append(f"  {cell['status']} #{cell['job']} {' '.join(cell['overrides'])}: {cell['reason']}")
        report = "\n".join(lines)
        if counts["failed"]:
            log.error(report)
            print(report, file=sys.stderr)
            sys.exit(1)
        log.info(report)
