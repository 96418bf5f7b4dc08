"""Tables from records only: `python -m foca_bench.tables` (`make tables`).

Loads every record into one DataFrame (`foca_bench.results.load`), writes it whole to `results/tables/records.csv`,
and per (benchmark, model) group a Markdown and a LaTeX table to `results/tables/`, shaped like the paper's Table 3
(Method | Latency | FLOPs | Speed | quality columns) with ↑/↓ markers as lm-eval's `make_table` does. Where the
paper has a table for the model (`results/paper/<table>.yaml`, the paper's own numbers as labelled reference data),
its rows come first in the paper's order, each of our columns sits beside the paper's and our value carries its
difference to the paper's (relative for cost columns, absolute for quality). A paper row shows the records of its
run, `conf/row/<table>/<row>.yaml`. Every number of ours names the record it comes from; a row with no record
shows `—`, a value the record lists under `faults` (NaN or infinite when measured) shows `non-finite`.
"""

import argparse
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from foca_bench import REPO_DIR, significance
from foca_bench.names import METHOD_NAMES, METRIC_NAMES, MODEL_NAMES, label
from foca_bench.profiling import BEYOND_FLOPS, NOISY, SPREAD, latency_mark
from foca_bench.results import block, load, missing, read

PAPER_DIR = REPO_DIR / "results" / "paper"
LATENCY_MARK = " ‡"  # a latency the record notes is not the method's own (`profile.latency_note`)
# column key -> (header, digits, higher_is_better, suffix); quality metrics add their own from the records
COLUMNS = {
    "latency_s": ("Latency(s)", 3, False, ""),
    "latency_speedup": ("Latency speed", 2, True, "×"),
    "flops_T": ("FLOPs(T)", 4, False, ""),
    "flops_speedup": ("Speed", 2, True, "×"),
}
PROFILE_KEYS = {"latency_s": "latency_s", "latency_speedup": "latency_speedup", "flops": "flops_T",
                "flops_speedup": "flops_speedup"}  # a `profile.<key>` fault marks this column
METRIC_DIGITS = {"rel_l2": 4, "ssim": 4, "image_reward": 4}
HIGHER_IS_BETTER = {"fid": False, "rel_l2": False}  # paper-only metrics default to ↑
LATENCY = ("latency_s", "latency_speedup")  # the cells `mark` marks
MARKS_NOTE = (f"{NOISY}: its latency samples spread more than {SPREAD:.0%} (interquartile range / median) after "
              f"repeats up to the time cap; {BEYOND_FLOPS}: even the lower quartile of its paired latency speed-ups "
              "exceeds the FLOPs speed-up, which less work cannot explain: a measurement artefact (README, 'Latency "
              "you can trust').")
FAULT = "non-finite"


@dataclass
class Table:
    """A rendered table: string cells under their headers, a title and notes."""

    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def values(r: pd.Series) -> dict[str, Optional[float]]:
    """A record row's numbers by column key."""
    out = {k: r.get(f"profile.{k}") for k in ("latency_s", "latency_speedup", "flops_speedup")}
    flops = r.get("profile.flops")
    out["flops_T"] = None if missing(flops) else flops / 1e12
    out.update({k[len("metrics."):]: v for k, v in r.items() if k.startswith("metrics.")})
    return {k: None if missing(v) else v for k, v in out.items()}


def faulted(r: pd.Series) -> set[str]:
    """Column keys whose value the record lists under `faults`; non-finite samples taint every metric."""
    out: set[str] = set()
    for fault in r.get("faults") if isinstance(r.get("faults"), list) else []:
        parts = fault["field"].split(".")
        if parts[0] == "samples":
            out |= {k[len("metrics."):] for k in r.index if k.startswith("metrics.")}
        elif parts[0] == "metrics" and len(parts) > 1:
            out.add(parts[1])
        elif parts[0] == "profile" and len(parts) > 1 and parts[1] in PROFILE_KEYS:
            out.add(PROFILE_KEYS[parts[1]])
    return out


def mark(r: Optional[pd.Series]) -> str:
    """The latency cells' mark of a record row (`profiling.latency_mark` on its samples); '' for rows without."""
    if r is None:
        return ""
    mine, base = r.get("profile.latency_detail.samples_s"), r.get("profile.latency_detail.none.samples_s")
    if missing(mine) or missing(base) or not mine or not base:
        return ""
    flops_speedup = r.get("profile.flops_speedup")
    return latency_mark(mine, base, None if missing(flops_speedup) else flops_speedup)


def _latency_note_of(r: Optional[pd.Series]) -> Optional[str]:
    note = r.get("profile.latency_note") if r is not None else None
    return None if missing(note) or not note else note


def _latency_notes(rows: pd.DataFrame) -> list[str]:
    """One `LATENCY_MARK` note per method whose records say their latency is not the method's own."""
    notes = sorted({f"{METHOD_NAMES.get(r['method'], r['method'])}: {_latency_note_of(r)}"
                    for _, r in rows.iterrows() if _latency_note_of(r)})
    return [f"{LATENCY_MARK.strip()} {note}" for note in notes]


def _marks_notes(rows: pd.DataFrame) -> list[str]:
    return ([MARKS_NOTE] if any(mark(r) for _, r in rows.iterrows()) else []) + _latency_notes(rows)


def _fmt(value: Optional[float], digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}{suffix}"


def _column(key: str, higher_is_better: dict) -> tuple[str, int, str]:
    """(header with ↑/↓, digits, suffix) of a column key."""
    if key in COLUMNS:
        name, digits, up, suffix = COLUMNS[key]
    else:
        up = higher_is_better.get(key, HIGHER_IS_BETTER.get(key, True))
        name, digits, suffix = METRIC_NAMES.get(key, key), METRIC_DIGITS.get(key, 3), ""
    return f"{name} {'↑' if up else '↓'}", digits, suffix


def _metrics(group: pd.DataFrame) -> list[str]:
    """The metric columns of a group: the known metrics any of its records has, in display order."""
    present = {m for names in group["metric_names"] for m in names}
    return [m for m in METRIC_NAMES if m in present]


def _latest_by_label(group: pd.DataFrame) -> pd.DataFrame:
    """The latest record of each row name, in the order the names first appear by modification time."""
    by_time = group.sort_values("mtime", kind="stable")
    order = by_time.drop_duplicates("label", keep="first")["label"]
    return by_time.drop_duplicates("label", keep="last").set_index("label", drop=False).loc[order]


def _full_steps(r: pd.Series) -> str:
    from foca_bench.adapters import ADAPTERS

    full = r.get("samples.full_steps")  # missing: unknown (diffusers' hooks do not report it)
    adapter = ADAPTERS.get(r["model"])  # the engine's steps (Inf-DiT: 39 Heun evaluations for 20 steps)
    steps = adapter.engine_steps(int(r["samples.steps"])) if adapter else int(r["samples.steps"])
    return f"{'—' if missing(full) else int(full)}/{steps}"


def _cells(r: Optional[pd.Series], keys: list[str], cols: dict, paper: Optional[dict] = None,
           stats: Optional[tuple] = None) -> list[str]:
    """Our formatted value of each column key (with the paper's beside it where `paper` has the column); with
    `stats` = (the row's (path, record), the baseline's or None), quality cells carry ± and ≈ (`significance`)."""
    v, bad = (values(r), faulted(r)) if r is not None else ({}, set())
    m, noted = mark(r), _latency_note_of(r)
    cells = []
    for k in keys:
        _, digits, suffix = cols[k]
        ours = FAULT if k in bad else _fmt(v.get(k), digits, suffix)
        if k in LATENCY and v.get(k) is not None and k not in bad:  # statistical marks, then `LATENCY_MARK`
            ours += m + (LATENCY_MARK if noted else "")
        if k not in COLUMNS and stats is not None and r is not None and k not in bad:
            ours = significance.cells(*stats, [k], [ours], [digits])[0]
        if paper is not None and k in paper["columns"]:
            paper_value = paper["values"].get(k)
            cells += [ours + _difference(v.get(k), paper_value, relative=k in COLUMNS),
                      _fmt(paper_value, digits, suffix)]
        else:
            cells.append(ours)
    return cells


def _stats(rows: pd.DataFrame) -> tuple[dict, Optional[tuple], list[str]]:
    """Each row's (path, record) by record path, the full-compute baseline among the latest record of each row
    name, and the statistics note (when any metric carries an interval)."""
    records = {r["record"]: (Path(r["record"]), read(Path(r["record"]))) for _, r in rows.iterrows()}
    latest = [records[path] for path in _latest_by_label(rows)["record"]]
    base = significance.baseline(latest)  # each quality cell: ± and ≈ against full compute
    intervals = any("interval" in m for _, rec in records.values() for m in rec.get("metrics", {}).values())
    return records, base, [significance.NOTE.format(baseline=label(base[1]))] if base and intervals else []


def build_table(group: pd.DataFrame, title: str = "") -> Table:
    """Our records only (a model the paper has no table for): the latest record of each row name."""
    rows = _latest_by_label(group)
    keys = ["latency_s", "flops_T", "flops_speedup", "latency_speedup", *_metrics(rows)]
    cols = {k: _column(k, group.attrs.get("higher_is_better", {})) for k in keys}
    header = ["Method", *(cols[k][0] for k in keys[:4]), "Full steps", *(cols[k][0] for k in keys[4:]), "Record"]

    def order(r: pd.Series) -> tuple:
        flops = r.get("profile.flops")
        return (r["method"] != "none" or r["config.sampler.steps"] != 50, -(0.0 if missing(flops) else flops),
                r["label"])

    records, base, notes = _stats(rows)
    out = []
    for _, r in sorted(rows.iterrows(), key=lambda item: order(item[1])):
        cells = _cells(r, keys, cols, stats=(records[r["record"]], base))
        out.append([r["label"], *cells[:4], _full_steps(r), *cells[4:], f"`{r['run_id']}`"])
    return Table(title, pd.DataFrame(out, columns=header), _marks_notes(rows) + notes)


def load_paper_tables(paper_dir: Path = PAPER_DIR) -> dict[str, dict]:
    """The paper's tables (reference data) by model name."""
    tables = {}
    for path in sorted(Path(paper_dir).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        tables[data["model"]] = {**data, "path": path}
    return tables


@lru_cache(maxsize=None)
def row_run(table: str, row: str, model: str) -> dict:
    """What a paper row runs: `conf/row/<table>/<row>.yaml` composed with `experiment=<table>` (else with
    `model=<model>`), as the method, the step count and the cache knobs of its identity. A row that cannot be
    validated on this machine (L2C's router, SmoothCache's calibration are not here) is the knobs its file sets
    (`subset`: a record with those, any others)."""
    from foca_bench.config import compose, validate
    from foca_bench.identity import identity

    base = f"experiment={table}" if (REPO_DIR / "conf" / "experiment" / f"{table}.yaml").is_file() else f"model={model}"
    cfg = compose(base, f"+row/{table}={row}")
    try:
        ident = identity(cfg, validate(cfg))
    except ValueError:
        own = yaml.safe_load((REPO_DIR / "conf" / "row" / table / f"{row}.yaml").read_text())
        return {"method": cfg.cache.name, "steps": cfg.sampler.steps, "subset": True,
                "cache": {k: v for k, v in (own.get("cache") or {}).items() if not str(k).endswith("_path")}}
    return {"method": ident["cache"]["name"], "steps": ident["sampler"]["steps"],
            "cache": {k: v for k, v in ident["cache"].items() if v is not None}}


def matches(r: pd.Series, run: dict) -> bool:
    """A record shows in a paper row if it has the row's method, step count and every cache knob of the row (its
    other knobs at the method's defaults: the knobs must be equal as a whole; with `subset`, those the row sets)."""
    if r["method"] != run["method"] or r["config.sampler.steps"] != run["steps"]:
        return False
    cache = block(r, "config.cache")
    if run.get("subset"):
        return all(cache.get(k) == v for k, v in run["cache"].items())
    return cache == run["cache"]


def _difference(ours: Optional[float], paper: Optional[float], relative: bool) -> str:
    if ours is None or paper is None:
        return ""
    if relative:
        return f" ({100 * (ours - paper) / paper:+.2f}%)" if paper else ""
    return f" (Δ {ours - paper:+.3g})"


def build_paper_table(paper: dict, group: pd.DataFrame, title: str = "") -> Table:
    """The paper's rows in its order, ours beside the paper's; our records matching no paper row follow."""
    keys = list(paper["columns"])
    keys += [k for k in ("latency_s", "latency_speedup", "flops_T", "flops_speedup") if k not in keys]
    keys += [m for m in _metrics(group) if m not in keys]
    cols = {k: _column(k, group.attrs.get("higher_is_better", {})) for k in keys}
    header = ["Method"]
    for k in keys:
        header += [f"{cols[k][0]} (ours)", f"{cols[k][0]} (paper)"] if k in paper["columns"] else [cols[k][0]]
    header += ["Full steps", "Record"]

    def tail(r: Optional[pd.Series]) -> list[str]:
        return [_full_steps(r), f"`{r['run_id']}`"] if r is not None else ["—", "paper only"]

    records, base, stats_note = _stats(group)
    used: set[int] = set()
    out = []
    for prow in paper["rows"]:
        run = row_run(paper["table"], prow["row"], paper["model"]) if prow["row"] else None
        found = group[[matches(r, run) for _, r in group.iterrows()]] if run else group.iloc[:0]
        r = found.sort_values("mtime", kind="stable").iloc[-1] if len(found) else None
        used.update(found.index)
        stats = (records[r["record"]], base) if r is not None else None
        out.append([prow["label"], *_cells(r, keys, cols, {"columns": paper["columns"], "values": prow["paper"]},
                                           stats), *tail(r)])
    for name, r in _latest_by_label(group.drop(index=list(used))).iterrows():
        out.append([f"{name} (ours only)", *_cells(r, keys, cols, {"columns": paper["columns"], "values": {}},
                                                   (records[r["record"]], base)), *tail(r)])
    notes = [f"Paper columns: {paper['source']} ({paper['title']}), from `{paper['path'].relative_to(REPO_DIR)}`; "
             "the paper's own numbers, not produced by foca-bench. Our cells show (ours - paper) in brackets: "
             "relative for cost columns, absolute for quality."]
    if paper.get("note"):
        notes.append(paper["note"])
    notes += _marks_notes(group) + stats_note
    return Table(title, pd.DataFrame(out, columns=header), notes)


def to_markdown(table: Table) -> str:
    """GitHub Markdown (pandas' `to_markdown` needs `tabulate`, which the project does not depend on)."""
    header = list(table.frame.columns)
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.frame.itertuples(index=False)]
    return "\n".join(lines + [""] + table.notes) + "\n"


_LATEX = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
          "×": r"$\times$", "Δ": r"$\Delta$", "—": "--", "α": r"$\alpha$", "∞": r"$\infty$", "`": "", "→": r"$\to$",
          "†": r"$\dagger$", "§": r"\S"}


def _tex(text: Any) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A booktabs table (`\\usepackage{booktabs}`), laid out by pandas' `to_latex`; notes as comments."""
    frame = table.frame.map(_tex).rename(columns=_tex)
    body = frame.to_latex(index=False, escape=False, column_format="l" + "r" * (frame.shape[1] - 1),
                          caption=_tex(table.title), position="t")
    notes = "".join(f"% {_tex(note)}\n" for note in table.notes)
    return body.replace("\\end{table}\n", notes + "\\end{table}\n")


def _latency_note(results_dir: Path, benchmark: str, model: str, first: pd.Series) -> str:
    where = f"`{results_dir}/{benchmark}/{model}/<method>/<Record>.json`"
    if missing(first.get("profile.latency_detail.repeats")):
        return f"FLOPs: one sample's whole generation (FlopCounterMode). Each row's numbers come from {where}."
    steps = first.get("profile.baseline.steps")
    baseline = f"the uncached model (method=none, {50 if missing(steps) else int(steps)} steps)"
    return (f"Latency: median of {int(first['profile.latency_detail.repeats'])} runs of a batch of "
            f"{int(first['profile.latency_detail.batch_size'])} on {first['device']} after warm-up, interleaved with "
            f"{baseline}; FLOPs: one sample's whole generation (FlopCounterMode). Speed = FLOPs speed-up against "
            f"{baseline} in the same process. Each row's numbers come from {where}.")


def write_tables(results_dir: Path, out_dir: Path, paper_dir: Path = PAPER_DIR) -> list[Path]:
    """`records.csv` (every record, one row each) and a Markdown and a LaTeX table per (benchmark, model) group;
    returns the Markdown paths."""
    df = load(results_dir)
    papers = load_paper_tables(paper_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["metric_names"]).to_csv(out_dir / "records.csv", index=False)
    written = []
    for (benchmark, model), group in df.groupby(["benchmark", "model"], sort=True):
        title = f"{benchmark} on {MODEL_NAMES.get(model, model)}"
        if model in papers:
            table = build_paper_table(papers[model], group, f"{title} (paper {papers[model]['table']})")
        else:
            table = build_table(group, title)
        table.notes.append(_latency_note(results_dir, benchmark, model, group.iloc[0]))
        out = out_dir / f"{benchmark}_{model}.md"
        out.write_text(to_markdown(table))
        out.with_suffix(".tex").write_text(to_latex(table))
        written.append(out)
        print(to_markdown(table))
    if df.empty:
        print(f"No records under {results_dir}: run `python run.py ...` first.")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/tables")
    args = parser.parse_args()
    write_tables(args.results, args.out or args.results / "tables")


if __name__ == "__main__":
    main()
