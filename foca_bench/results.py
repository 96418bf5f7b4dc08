"""Records as a pandas DataFrame: one row per record, the source of every table and figure.

    from foca_bench.results import load
    df = load("results")
    df[df.benchmark == "toy_fid"].pivot_table(index="method", columns="config.cache.N", values="metrics.fid")

Columns: `run_id`, `benchmark`, `model`, `method`, `label` (the row name tables show), `device`, `world_size`,
`trace`, `sample_grid`, `faults`;
the record's config, profile, memory, samples and timing blocks flattened with dots (`config.cache.N`,
`profile.flops_speedup`, `memory.cache_bytes_peak`, `samples.full_steps`); each metric's value as
`metrics.<name>` (its ↑/↓ flag in `df.attrs["higher_is_better"]`, the record's metric names in `metric_names`);
`record` (the file) and `mtime`. A record
that cannot be read (truncated, not JSON, not a record) is reported by path in a warning and skipped.
"""

import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from foca_bench.names import label
from foca_bench.records import record_files

FLAT = ("config", "profile", "memory", "samples", "timing")  # blocks flattened into dotted columns
TOP = ("run_id", "benchmark", "model", "method", "device", "world_size", "trace", "sample_grid")
REQUIRED = ("run_id", "benchmark", "model", "method", "config", "profile")


def _flatten(node: dict, prefix: str, out: dict) -> None:
    for key, value in node.items():
        if isinstance(value, dict) and value:
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def row(record: dict, path: Path) -> dict:
    """A record's DataFrame row."""
    out: dict[str, Any] = {k: record.get(k) for k in TOP}
    out["label"] = label(record)
    for block in FLAT:
        _flatten({k: v for k, v in record.get(block, {}).items() if k != "shards"}, f"{block}.", out)
    for name, m in record.get("metrics", {}).items():
        out[f"metrics.{name}"] = m["value"]
    out["metric_names"] = list(record.get("metrics", {}))  # a metric whose value is null is still the record's
    out["faults"] = record.get("faults") or None
    out["record"] = str(path)
    out["mtime"] = path.stat().st_mtime
    return out


def frame(records: Iterable[tuple[Path, dict]]) -> pd.DataFrame:
    """The DataFrame of (path, record) pairs, with `attrs["higher_is_better"]` = {metric: bool}."""
    rows, better = [], {}
    for path, rec in records:
        rows.append(row(rec, path))
        better.update({name: m["higher_is_better"] for name, m in rec.get("metrics", {}).items()})
    df = pd.DataFrame(rows, columns=None if rows else [*TOP, "label", "metric_names", "faults", "record", "mtime"])
    df.attrs["higher_is_better"] = better
    return df


def read(path: Path) -> dict:
    """One record; raises ValueError when it is not one (truncated, not JSON, a required block missing, no row
    name)."""
    record = json.loads(Path(path).read_text())  # accepts the NaN of records written before records were strict
    missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"not a run record (no {', '.join(missing)})")
    try:
        label(record)
    except (KeyError, TypeError) as err:  # a method this code does not know, a config block missing
        raise ValueError(f"cannot name its row ({type(err).__name__}: {err})") from err
    return record


def load(results_dir: Any = "results") -> pd.DataFrame:
    """Every record under `results_dir`, one row each (see the module docstring); unreadable ones are skipped
    with a warning that names them."""
    good = []
    for path in record_files(Path(results_dir)):
        try:
            good.append((path, read(path)))
        except (OSError, ValueError) as err:
            warnings.warn(f"Skipping unreadable record {path}: {type(err).__name__}: {err}", stacklevel=2)
    return frame(good)


def block(r: pd.Series, prefix: str) -> dict:
    """The entries of a row under a dotted prefix (`config.cache`) as a dict, without the missing ones (other
    records' columns)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in r.items() if k.startswith(f"{prefix}.") and not missing(v)}


def missing(value: Any) -> bool:
    """None or NaN: a cell a record does not have (lists and strings are values)."""
    return value is None or (isinstance(value, float) and value != value)
