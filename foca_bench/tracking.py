"""Experiment tracking: `logger=wandb` mirrors each run's record into a Weights & Biases run.

Logged: the resolved config, the metrics and the profile block (history and summary), the sample grid, the run's
table row and the whole (benchmark, model) table built from the records so far (`foca_bench.tables`). The record
under `results/` stays the source of truth; tracking never decides anything. `logger.mode=offline` (the default)
needs no network: `wandb sync <logger.dir>/wandb/offline-run-*` uploads later.
"""

import logging
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger("foca_bench")


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under flat keys: `profile/<key>` and `metrics/<name>`."""
    out = {f"profile/{k}": v for k, v in record["profile"].items() if isinstance(v, (int, float))}
    out.update({f"metrics/{k}": m["value"] for k, m in record.get("metrics", {}).items() if m["value"] is not None})
    if "full_steps" in record.get("samples", {}):
        out["samples/full_steps"] = record["samples"]["full_steps"]
    return out


def _wandb_table(table):
    import wandb

    return wandb.Table(dataframe=table.frame)


def log_run(cfg: DictConfig, record: dict, record_file: Path) -> Optional[Path]:
    """Logs one finished run; returns the wandb run directory (None with `logger=none`)."""
    if cfg.logger.name == "none":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from foca_bench.names import label
    from foca_bench.results import frame, load
    from foca_bench.tables import build_table

    group = cfg.logger.group
    if group is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
        except ValueError:  # not under @hydra.main
            group = None
    Path(cfg.logger.dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=group,
                     tags=list(cfg.logger.tags) + [record["model"], record["method"], record["benchmark"]],
                     name=f"{record['model']}/{label(record)}/{record['run_id']}", mode=cfg.logger.mode,
                     dir=cfg.logger.dir, config={**record["config"], "run_id": record["run_id"],
                                                 "record": str(record_file)}, reinit="create_new")
    try:
        values = scalars(record)
        run.log(values)
        run.summary.update(values)
        if record.get("sample_grid") and Path(record["sample_grid"]).is_file():
            run.log({"samples": wandb.Image(record["sample_grid"], caption=label(record))})
        run.log({"row": _wandb_table(build_table(frame([(record_file, record)]), label(record)))})
        df = load(cfg.results_dir)
        peers = df[(df["benchmark"] == record["benchmark"]) & (df["model"] == record["model"])]
        run.log({"table": _wandb_table(build_table(peers, f"{record['benchmark']} on {record['model']}"))})
        directory = Path(run.dir).parent
    finally:
        run.finish()
    log.info(f"Logged to wandb ({cfg.logger.mode}): {directory}")
    return directory
