"""Metric backends, one per file. Each function returns {metric: {"value": float|None, "higher_is_better": bool}}."""


def metric(value, higher_is_better: bool) -> dict:
    return {"value": None if value is None else float(value), "higher_is_better": higher_is_better}
