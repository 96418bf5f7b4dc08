"""Tables from records only: `python -m foca_bench.tables` (`make tables`).

Writes, per (benchmark, model) group of records, a Markdown and a LaTeX table to `results/tables/`, shaped like
the paper's Table 3 (Method | Latency | FLOPs | Speed | quality columns) with ↑/↓ markers as lm-eval's
`make_table` does. Where the paper has a table for the model (`results/paper/<table>.yaml`, the paper's own
numbers as labelled reference data), its rows come first in the paper's order, each of our columns sits beside
the paper's and our value carries its difference to the paper's (relative for cost columns, absolute for
quality). Every number of ours names the record it comes from; a row with no record shows `—`. Display names
live here and nowhere else.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import methods
from foca_bench import REPO_DIR, significance
from foca_bench.config import model_method_defaults
from foca_bench.profiling import BEYOND_FLOPS, NOISY, SPREAD, latency_mark
from foca_bench.records import group_records

PAPER_DIR = REPO_DIR / "results" / "paper"
METHOD_NAMES = {"none": "DDIM", "reuse": "Reuse", "fora": "FORA", "taylorseer": "TaylorSeer", "foca": "FoCa",
                "teacache": "TeaCache", "delta_dit": "Δ-DiT", "diffusers_taylorseer": "diffusers TaylorSeer",
                "diffusers_fbcache": "diffusers FBCache", "diffusers_pab": "diffusers PAB", "toca": "ToCa",
                "duca": "DuCa", "diffusers_magcache": "diffusers MagCache", "dbcache": "DBCache",
                "cachedit_taylorseer": "cache-dit TaylorSeer", "cachedit_foca": "cache-dit FoCa",
                "diffusers_fastercache": "diffusers FasterCache", "chipmunk": "Chipmunk", "smoothcache": "SmoothCache",
                "l2c": "L2C", "abcache": "AB-Cache", "foca_adaptive": "Adaptive FoCa"}
ALWAYS_SHOWN = {"taylorseer": ("O",), "teacache": ("l",), "diffusers_taylorseer": ("O",),  # as the paper's labels do
                "diffusers_fbcache": ("threshold",), "diffusers_magcache": ("threshold",),
                **{name: ("Fn", "Bn") for name in ("dbcache", "cachedit_taylorseer", "cachedit_foca")},
                "smoothcache": ("alpha",), "l2c": ("threshold",), "foca_adaptive": ("tol",)}
LATENCY_MARK = " ‡"  # a latency the record notes is not the method's own (`profile.latency_note`)
MODEL_NAMES = {
    "toy_dit": "toy_dit: 1.4M-parameter DiT on scikit-learn digits (16x16). TOY MODEL, not the paper's benchmark",
    "dit_xl_2": "DiT-XL/2 256x256",
    "flux": "FLUX.1-dev 1024x1024",
    "hunyuan_video": "HunyuanVideo 480x640, 65 frames",
    "inf_dit": "Inf-DiT 512→2048 (EDM Heun, 39 evaluations)",
}
# column key -> (header, digits, higher_is_better, suffix); quality metrics add their own from the records
COLUMNS = {
    "latency_s": ("Latency(s)", 3, False, ""),
    "latency_speedup": ("Latency speed", 2, True, "×"),
    "flops_T": ("FLOPs(T)", 4, False, ""),
    "flops_speedup": ("Speed", 2, True, "×"),
}
METRIC_NAMES = {"fid": "FID", "is": "IS", "class_acc": "Acc", "psnr": "PSNR", "ssim": "SSIM", "rel_l2": "RelL2",
                "image_reward": "ImageReward", "clip_score": "CLIP", "vbench": "VBench(%)"}
METRIC_DIGITS = {"rel_l2": 4, "ssim": 4, "image_reward": 4}
HIGHER_IS_BETTER = {"fid": False, "rel_l2": False}  # paper-only metrics default to ↑
LATENCY = ("latency_s", "latency_speedup")  # the cells `mark` marks
MARKS_NOTE = (f"{NOISY}: its latency samples spread more than {SPREAD:.0%} (interquartile range / median) after "
              f"repeats up to the time cap; {BEYOND_FLOPS}: even the lower quartile of its paired latency speed-ups "
              "exceeds the FLOPs speed-up, which less work cannot explain: a measurement artefact (README, 'Latency "
              "you can trust').")


@dataclass
class Table:
    """A rendered table: plain-text cells, rendered to Markdown or LaTeX."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def label(record: dict) -> str:
    """The row name: the paper's naming, plus every knob that differs from the method's defaults."""
    method, cache = record["method"], _cache(record)
    steps = record["config"]["sampler"]["steps"]
    if method == "none":
        return f"DDIM-{steps} steps"
    name = METHOD_NAMES.get(method, method)
    knobs = [f"N={cache['N']}"] if "N" in cache else []  # schedule-free methods have no N in their identity
    if method == "foca" and cache.get("corrector") == "none":
        name = "BDF2-only"
    for key in _non_default_knobs(record, show_order=True):
        if key != "corrector":
            knobs.append(f"{key}={cache[key]}")
    suffix = "" if steps == 50 else f", {steps} steps"
    return f"{name} ({', '.join(knobs)}{suffix})"


def _cache(record: dict) -> dict:
    """A record's cache knobs, with the values its identity leaves out (`CacheConfig.omit_from_identity`)."""
    return {**methods.get(record["method"]).config_class.omit_from_identity, **record["config"]["cache"]}


def _non_default_knobs(record: dict, show_order: bool = False) -> list[str]:
    """Cache knobs of a record beyond N that differ from the method's defaults (`show_order`: also the knobs the
    paper always names, e.g. TaylorSeer's order). Model-specific knobs (TeaCache's polynomial) are not knobs of
    a row, nor is a knob at the model's own default (`model.method_defaults`, e.g. TaylorSeer's first_enhance)."""
    cache = _cache(record)
    cls = methods.get(record["method"])
    specialized = model_method_defaults(record["config"]["model"]["name"], record["method"])
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # list-valued knobs
                for f in dataclasses.fields(cls.config_class)}
    defaults.update(record["config"]["model"].get("method_defaults", {}).get(record["method"]) or {})  # the model's
    defaults.update(specialized)  # conf/model_method/<model>_<method>.yaml
    always = ALWAYS_SHOWN.get(record["method"], ()) if show_order else ()
    knobs = [k for k, v in cache.items() if k not in ("name", "N", "warmup", "steps", *cls.model_specific)
             and (v != defaults.get(k) or k in always)]
    if "warmup" in cache and cache["warmup"] != specialized.get("warmup", record["config"]["model"]["warmup"]):
        knobs.append("warmup")
    return knobs


def values(record: dict) -> dict[str, Optional[float]]:
    """A record's numbers by column key."""
    p = record["profile"]
    out: dict[str, Optional[float]] = {
        "latency_s": p.get("latency_s"), "latency_speedup": p.get("latency_speedup"),
        "flops_T": p["flops"] / 1e12 if "flops" in p else None, "flops_speedup": p.get("flops_speedup"),
    }
    out.update({m: v["value"] for m, v in record.get("metrics", {}).items()})
    return out


def mark(record: dict) -> str:
    """The latency cells' mark of a record (`profiling.latency_mark` on its samples); '' for records without."""
    p = record.get("profile", {})
    lat = p.get("latency_detail") or {}
    mine, base = lat.get("samples_s"), (lat.get("none") or {}).get("samples_s")
    return latency_mark(mine, base, p.get("flops_speedup")) if mine and base else ""


def _cells(keys: list[str], cols: list[tuple[str, int, str]], v: dict, rec: Optional[dict]) -> list[str]:
    """Formatted cells of `keys`, the latency cells carrying the record's marks (statistical, then `LATENCY_MARK`)."""
    m = mark(rec) if rec else ""
    return [_marked(rec, k, _fmt(v.get(k), d, s) + (m if k in LATENCY and v.get(k) is not None else ""))
            for k, (_, d, s) in zip(keys, cols)]


def _fmt(value: Optional[float], digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}{suffix}"


def _column(key: str, records: list[dict]) -> tuple[str, int, str]:
    """(header with ↑/↓, digits, suffix) of a column key."""
    if key in COLUMNS:
        name, digits, up, suffix = COLUMNS[key]
    else:
        up = next((r["metrics"][key]["higher_is_better"] for r in records if key in r.get("metrics", {})),
                  HIGHER_IS_BETTER.get(key, True))
        name, digits, suffix = METRIC_NAMES.get(key, key), METRIC_DIGITS.get(key, 3), ""
    return f"{name} {'↑' if up else '↓'}", digits, suffix


def _latest_by_label(records: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict]]:
    rows: dict[str, tuple[Path, dict]] = {}
    for path, rec in sorted(records, key=lambda pr: pr[0].stat().st_mtime):
        rows[label(rec)] = (path, rec)  # later records of the same row replace earlier ones
    return rows


def _full_steps(rec: dict) -> str:
    from foca_bench.adapters import ADAPTERS

    full = rec["samples"].get("full_steps")  # None: unknown (diffusers' hooks do not report it)
    adapter = ADAPTERS.get(rec["model"])  # the engine's steps (Inf-DiT: 39 Heun evaluations for 20 steps)
    steps = adapter.engine_steps(rec["samples"]["steps"]) if adapter else rec["samples"]["steps"]
    return f"{'—' if full is None else full}/{steps}"


def build_table(records: list[tuple[Path, dict]], title: str = "") -> Table:
    """Our records only (a model the paper has no table for)."""
    rows = _latest_by_label(records)
    recs = [r for _, r in rows.values()]
    keys = ["latency_s", "flops_T", "flops_speedup", "latency_speedup"]
    keys += [m for m in METRIC_NAMES if any(m in r.get("metrics", {}) for r in recs)]
    cols = [_column(k, recs) for k in keys]
    header = ["Method", *(c[0] for c in cols[:4]), "Full steps", *(c[0] for c in cols[4:]), "Record"]

    def order(item):
        rec = item[1][1]
        return (rec["method"] != "none" or rec["config"]["sampler"]["steps"] != 50,
                -rec["profile"].get("flops", 0.0), item[0])

    out = []
    base = significance.baseline(list(rows.values()))  # each quality cell: ± and ≈ against full compute
    for name, (path, rec) in sorted(rows.items(), key=order):
        cells = _cells(keys, cols, values(rec), rec)
        cells[4:] = significance.cells((path, rec), base, keys[4:], cells[4:], [c[1] for c in cols[4:]])
        out.append([name, *cells[:4], _full_steps(rec), *cells[4:], f"`{rec['run_id']}`"])
    notes = [significance.NOTE.format(baseline=label(base[1]))] if base and any(
        "interval" in m for r in recs for m in r.get("metrics", {}).values()) else []
    return Table(title, header, out, ([MARKS_NOTE] if any(mark(r) for r in recs) else []) + _latency_notes(recs)
                 + notes)


def _marked(record: Optional[dict], key: str, cell: str) -> str:
    """A latency cell of a record whose latency is not the method's own (a dense emulation) gets `LATENCY_MARK`."""
    noted = record is not None and record["profile"].get("latency_note") and key.startswith("latency")
    return cell + LATENCY_MARK if noted and cell else cell


def _latency_notes(records: list[dict]) -> list[str]:
    notes = sorted({f"{METHOD_NAMES.get(r['method'], r['method'])}: {r['profile']['latency_note']}"
                    for r in records if r["profile"].get("latency_note")})
    return [f"{LATENCY_MARK.strip()} {note}" for note in notes]


def load_paper_tables(paper_dir: Path = PAPER_DIR) -> dict[str, dict]:
    """The paper's tables (reference data) by model name."""
    tables = {}
    for path in sorted(Path(paper_dir).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        tables[data["model"]] = {**data, "path": path}
    return tables


def _lookup(record: dict, dotted: str) -> Any:
    if dotted == "method":
        return record["method"]
    node: Any = record["config"]
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matches(record: dict, match: Optional[dict]) -> bool:
    """A record is a paper row's if every `match` key agrees and its other knobs are the method's defaults."""
    if not match or any(_lookup(record, k) != v for k, v in match.items()):
        return False
    return all(f"cache.{k}" in match for k in _non_default_knobs(record))


def _difference(ours: Optional[float], paper: Optional[float], relative: bool) -> str:
    if ours is None or paper is None:
        return ""
    if relative:
        return f" ({100 * (ours - paper) / paper:+.2f}%)" if paper else ""
    return f" (Δ {ours - paper:+.3g})"


def build_paper_table(paper: dict, records: list[tuple[Path, dict]], title: str = "") -> Table:
    """The paper's rows in its order, ours beside the paper's; our records matching no paper row follow."""
    recs = [r for _, r in records]
    keys = list(paper["columns"])
    keys += [k for k in ("latency_s", "latency_speedup", "flops_T", "flops_speedup") if k not in keys]
    keys += [m for m in METRIC_NAMES if m not in keys and any(m in r.get("metrics", {}) for r in recs)]
    cols = {k: _column(k, recs) for k in keys}
    header = ["Method"]
    for k in keys:
        header += [f"{cols[k][0]} (ours)", f"{cols[k][0]} (paper)"] if k in paper["columns"] else [cols[k][0]]
    header += ["Full steps", "Record"]

    used: set[int] = set()
    out = []

    def row_cells(rec: Optional[dict], paper_values: dict) -> list[str]:
        v = values(rec) if rec else {}
        cells = []
        for k, ours in zip(keys, _cells(keys, [cols[k] for k in keys], v, rec)):
            _, digits, suffix = cols[k]
            if k in paper["columns"]:
                ours += _difference(v.get(k), paper_values.get(k), relative=k in COLUMNS)
                cells += [ours, _fmt(paper_values.get(k), digits, suffix)]
            else:
                cells.append(ours)
        cells += [_full_steps(rec) if rec else "—", f"`{rec['run_id']}`" if rec else "paper only"]
        return cells

    for prow in paper["rows"]:
        found = [(p, r) for p, r in records if matches(r, prow["match"])]
        rec = max(found, key=lambda pr: pr[0].stat().st_mtime)[1] if found else None
        used.update(id(r) for _, r in found)
        out.append([prow["label"], *row_cells(rec, prow["paper"])])
    rest = [(p, r) for p, r in records if id(r) not in used]
    for name, (_, rec) in _latest_by_label(rest).items():
        out.append([f"{name} (ours only)", *row_cells(rec, {})])
    notes = [f"Paper columns: {paper['source']} ({paper['title']}), from `{paper['path'].relative_to(REPO_DIR)}`; "
             "the paper's own numbers, not produced by foca-bench. Our cells show (ours - paper) in brackets: "
             "relative for cost columns, absolute for quality."]
    if paper.get("note"):
        notes.append(paper["note"])
    if any(mark(r) for r in recs):
        notes.append(MARKS_NOTE)
    return Table(title, header, out, notes + _latency_notes(recs))


def to_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines + [""] + table.notes) + "\n"


_LATEX = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
          "×": r"$\times$", "Δ": r"$\Delta$", "—": "--", "α": r"$\alpha$", "∞": r"$\infty$", "`": "", "→": r"$\to$",
          "†": r"$\dagger$", "§": r"\S"}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs table (`\\usepackage{booktabs}`)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{_tex(table.title)}}}",
             r"\begin{tabular}{l" + "r" * (len(table.header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {_tex(note)}" for note in table.notes]
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def _latency_note(results_dir: Path, benchmark: str, model: str, first: dict) -> str:
    lat = first["profile"].get("latency_detail", {})
    where = f"`{results_dir}/{benchmark}/{model}/<method>/<Record>.json`"
    baseline = f"the uncached model (method=none, {first['profile'].get('baseline', {}).get('steps', 50)} steps)"
    if not lat:
        return f"FLOPs: one sample's whole generation (FlopCounterMode). Each row's numbers come from {where}."
    return (f"Latency: median of {lat.get('repeats')} runs of a batch of {lat.get('batch_size')} on "
            f"{first['device']} after warm-up, interleaved with {baseline}; FLOPs: one sample's whole generation "
            f"(FlopCounterMode). Speed = FLOPs speed-up against {baseline} in the same process. Each row's numbers "
            f"come from {where}.")


def write_tables(results_dir: Path, out_dir: Path, paper_dir: Path = PAPER_DIR) -> list[Path]:
    """Markdown and LaTeX per (benchmark, model) group of records; returns the Markdown paths."""
    groups = group_records(results_dir)
    papers = load_paper_tables(paper_dir)
    written = []
    for (benchmark, model), records in groups.items():
        title = f"{benchmark} on {MODEL_NAMES.get(model, model)}"
        if model in papers:
            table = build_paper_table(papers[model], records, f"{title} (paper {papers[model]['table']})")
        else:
            table = build_table(records, title)
        table.notes.append(_latency_note(results_dir, benchmark, model, records[0][1]))
        out = out_dir / f"{benchmark}_{model}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_markdown(table))
        out.with_suffix(".tex").write_text(to_latex(table))
        written.append(out)
        print(to_markdown(table))
    if not groups:
        print(f"No records under {results_dir}: run `python run.py ...` first.")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/tables")
    parser.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                        help="also draw the figures (foca_bench.figures)")
    args = parser.parse_args()
    out = args.out or args.results / "tables"
    write_tables(args.results, out)
    if args.figures:
        from foca_bench.figures import write_figures

        write_figures(args.results, args.results / "figures")


if __name__ == "__main__":
    main()
