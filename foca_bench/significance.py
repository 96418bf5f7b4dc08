"""Intervals and paired comparisons from records, for tables and figures (numerics: `evaluation/uncertainty.py`).

A record's metric holds its bootstrap `interval` and what recomputes it: `per_sample` values and their
`statistic` (per-sample metrics), or, for FID/IS and VBench's total scores, `arrays` (the generated set's features
or logits and the reference statistics FID is measured against; the videos' per-dimension scores) that
`externalize` moves out of the JSON into `<run_id>.arrays.npz` beside the record. `compare` runs the paired
bootstrap of a row against the full-compute baseline of its table (same benchmark, seeds and sample count, and for
FID the same reference statistics), and `cell` writes `value ± half-width`, marked `≈` where the difference is not
distinguishable from 0 at the 95% level. docs/statistics.md explains the method.
"""

import json
from pathlib import Path
from typing import Optional

import numpy as np

from evaluation.uncertainty import LEVEL, RESAMPLES, SEED, SET_RESAMPLES, paired, set_paired, set_statistic
from foca_bench.records import atomic_write, atomic_write_json

SAME = " ≈"  # the cell's mark: not distinguishable from the baseline
NOTE = (f"± half-width of the {LEVEL:.0%} bootstrap interval over samples ({RESAMPLES} resamples; FID/IS and "
        f"VBench's total scores: {SET_RESAMPLES} resamples of the generated set's features or per-video scores; "
        f"seed {SEED}). {SAME.strip()}: the paired "
        "bootstrap difference to {baseline} on the same seeds has a 95% interval containing 0, i.e. the row is "
        "not distinguishable from it (docs/statistics.md).")
REFERENCE = ("real_mu", "real_sigma")  # a set metric's fixed reference statistics, shared by rows that compare


def arrays_path(record_path: Path) -> Path:
    return Path(record_path).with_suffix(".arrays.npz")


def externalize(record: dict, path: Path) -> None:
    """Moves the metrics' numpy `arrays` into `<record>.arrays.npz` (atomically), leaving that file's name."""
    arrays = {f"{name}/{key}": np.asarray(value) for name, m in record.get("metrics", {}).items()
              for key, value in (m.get("arrays") or {}).items()}
    if not arrays:
        return

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(arrays_path(path), write)
    for m in record["metrics"].values():
        if m.get("arrays"):
            m["arrays"] = arrays_path(path).name


def load_arrays(record_path: Path, name: str) -> Optional[dict]:
    """The arrays of metric `name` of the record at `record_path`, or None when the record has none."""
    file = arrays_path(record_path)
    if not file.is_file():
        return None
    with np.load(file) as f:
        return {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(f"{name}/")} or None


def half_width(m: dict) -> Optional[float]:
    lo, hi = m.get("interval") or (None, None)
    return None if lo is None or hi is None else (hi - lo) / 2.0


def same_samples(a: dict, b: dict) -> bool:
    sa, sb = a.get("samples", {}), b.get("samples", {})
    return (a.get("benchmark") == b.get("benchmark") and sa.get("count") == sb.get("count")
            and sa.get("seeds") == sb.get("seeds"))


def compare(row: tuple[Path, dict], base: tuple[Path, dict], name: str) -> Optional[dict]:
    """Paired bootstrap of metric `name`, row minus baseline; None when either lacks what recomputes it."""
    (rp, r), (bp, b) = row, base
    m, mb = r.get("metrics", {}).get(name), b.get("metrics", {}).get(name)
    if not m or not mb or not same_samples(r, b) or m.get("statistic") != mb.get("statistic"):
        return None
    if m.get("per_sample") is not None and mb.get("per_sample") is not None:
        return paired(m["per_sample"], mb["per_sample"], m["statistic"])
    if not (m.get("arrays") and arrays_path(rp).is_file() and arrays_path(bp).is_file()):
        return None

    def set_metric() -> Optional[dict]:  # loads the arrays (645 MB at FID-50k) only when the verdict is not cached
        ar, ab = load_arrays(rp, name), load_arrays(bp, name)
        if ar is None or ab is None:
            return None
        if any(not np.array_equal(ar[k], ab.get(k)) for k in REFERENCE if k in ar):
            return None  # FIDs against different reference statistics: not a paired comparison
        fn, x = set_statistic(m["statistic"], ar)
        return set_paired(x, set_statistic(mb["statistic"], ab)[1], fn, progress=f"<{name}> paired bootstrap")

    return _cached(rp, bp, name, set_metric)


def _cached(row_path: Path, base_path: Path, name: str, compute) -> Optional[dict]:
    """A set metric's paired verdict (None: not comparable), kept beside the row's record (`<run_id>.paired`) under a
    key naming the metric, the baseline's arrays file and both arrays files' size and modification time, so `make
    tables` neither loads nor resamples an ImageNet FID pair again (an hour of CPU at 50k samples) until either
    record's arrays change."""
    files = [arrays_path(row_path), arrays_path(base_path)]
    key = "|".join([name, files[1].name, *(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files),
                    f"{SET_RESAMPLES}:{SEED}:{LEVEL}"])
    cache_file = Path(row_path).with_suffix(".paired")  # JSON; not `*.json`, which `record_files` reads as records
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # unreadable: recomputed and rewritten
    if key not in cache:
        cache[key] = compute()
        atomic_write_json(cache_file, cache)
    return cache[key]


def baseline(rows: list[tuple[Path, dict]]) -> Optional[tuple[Path, dict]]:
    """The full-compute row of a table: `method=none` at the most steps."""
    nones = [pr for pr in rows if pr[1]["method"] == "none"]
    return max(nones, key=lambda pr: pr[1]["config"]["sampler"]["steps"]) if nones else None


def cell(text: str, m: Optional[dict], digits: int, verdict: Optional[dict]) -> str:
    """`text` (the formatted value) with ± half-width, and `SAME` when the verdict cannot tell it from the
    baseline."""
    hw = half_width(m) if m else None
    if hw is None or text == "—":
        return text
    return f"{text} ± {hw:.{digits}f}" + (SAME if verdict is not None and not verdict["distinguishable"] else "")


def cells(row: tuple[Path, dict], base: Optional[tuple[Path, dict]], keys: list[str], texts: list[str],
          digits: list[int]) -> list[str]:
    """Quality cells of a row: `cell` for each metric key, compared with `base` (not with itself)."""
    metrics = row[1].get("metrics", {})
    out = []
    for key, text, d in zip(keys, texts, digits):
        verdict = compare(row, base, key) if base is not None and base[1] is not row[1] else None
        out.append(cell(text, metrics.get(key), d, verdict))
    return out
