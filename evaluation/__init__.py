"""Metric backends, one per file. Each function returns {metric: {"value": float|None, "higher_is_better": bool}},
plus, where the backend has them, the metric's bootstrap interval and what recomputes it (`evaluation.uncertainty`:
`interval`, `per_sample`, `statistic`; a set metric's arrays under `arrays`, which the record keeps beside itself)."""


def metric(value, higher_is_better: bool, **extra) -> dict:
    return {"value": None if value is None else float(value), "higher_is_better": higher_is_better, **extra}
