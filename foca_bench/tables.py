"""Tables from records only: `python -m foca_bench.tables` (`make tables`).

Writes one Markdown table per (benchmark, model) to `results/tables/`, shaped like the paper's Table 3
(Method | Latency | FLOPs | Speed | quality columns), with ↑/↓ markers as lm-eval's `make_table` does. Every
row names the record it comes from. Display names live here and nowhere else.
"""

import argparse
import dataclasses
import math
from pathlib import Path

import methods
from foca_bench.records import iter_records

METHOD_NAMES = {"none": "DDIM", "reuse": "Reuse", "fora": "FORA", "taylorseer": "TaylorSeer", "foca": "FoCa"}
MODEL_NAMES = {
    "toy_dit": "toy_dit: 1.4M-parameter DiT on scikit-learn digits (16x16). TOY MODEL, not the paper's benchmark",
    "dit_xl_2": "DiT-XL/2 256x256",
}
METRIC_NAMES = {"fid": "FID", "is": "IS", "class_acc": "Acc", "psnr": "PSNR", "ssim": "SSIM", "rel_l2": "RelL2"}
METRIC_ORDER = list(METRIC_NAMES)


def label(record: dict) -> str:
    """The row name: the paper's naming, plus every knob that differs from the method's defaults."""
    method, cache = record["method"], record["config"]["cache"]
    steps = record["config"]["sampler"]["steps"]
    if method == "none":
        return f"DDIM-{steps} steps"
    defaults = {f.name: f.default for f in dataclasses.fields(methods.get(method).config_class)}
    name = METHOD_NAMES.get(method, method)
    knobs = [f"N={cache['N']}"]
    if method == "foca" and cache.get("corrector") == "none":
        name = "BDF2-only"
    for key, value in cache.items():
        if key in ("name", "N", "warmup", "corrector"):
            continue
        if key == "O" or value != defaults.get(key):
            knobs.append(f"{key}={value}")
    if cache.get("warmup") != record["config"]["model"]["warmup"]:
        knobs.append(f"warmup={cache['warmup']}")
    suffix = "" if steps == 50 else f", {steps} steps"
    return f"{name} ({', '.join(knobs)}{suffix})"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def build_table(records: list[tuple[Path, dict]]) -> str:
    """Markdown for one (benchmark, model) group; later records of the same row replace earlier ones."""
    rows: dict[str, tuple[Path, dict]] = {}
    for path, rec in sorted(records, key=lambda pr: pr[0].stat().st_mtime):
        rows[label(rec)] = (path, rec)
    metrics = [m for m in METRIC_ORDER if any(m in r.get("metrics", {}) for _, r in rows.values())]
    arrow = {}
    for _, rec in rows.values():
        for m, v in rec.get("metrics", {}).items():
            arrow[m] = "↑" if v["higher_is_better"] else "↓"
    header = ["Method", "Latency(s) ↓", "FLOPs(T) ↓", "Speed ↑", "Latency speed ↑", "Full steps"]
    header += [f"{METRIC_NAMES[m]} {arrow[m]}" for m in metrics] + ["Record"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def order(item):
        _, rec = item[1]
        return (rec["method"] != "none" or rec["config"]["sampler"]["steps"] != 50,
                -rec["profile"].get("flops", 0.0), item[0])

    for name, (path, rec) in sorted(rows.items(), key=order):
        p = rec["profile"]
        cells = [
            name,
            _fmt(p.get("latency_s")),
            _fmt(p["flops"] / 1e12, 4) if "flops" in p else "—",
            f"{p['flops_speedup']:.2f}×" if "flops_speedup" in p else "—",
            f"{p['latency_speedup']:.2f}×" if "latency_speedup" in p else "—",
            f"{rec['samples'].get('full_steps', '—')}/{rec['samples']['steps']}",
        ]
        cells += [_fmt(rec["metrics"][m]["value"], 4 if m in ("rel_l2", "ssim") else 3) if m in rec.get("metrics", {})
                  else "—" for m in metrics]
        cells.append(f"`{rec['run_id']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    groups: dict[tuple[str, str], list] = {}
    for path, rec in iter_records(results_dir):
        groups.setdefault((rec["benchmark"], rec["model"]), []).append((path, rec))
    written = []
    for (benchmark, model), records in sorted(groups.items()):
        first = records[0][1]
        lat = first["profile"].get("latency_detail", {})
        note = (f"Latency: median of {lat.get('repeats')} runs of a batch of {lat.get('batch_size')} on "
                f"{first['device']} after warm-up; FLOPs: one sample's whole generation (FlopCounterMode). Speed "
                "= FLOPs speed-up against DDIM-50 in the same process. Each row's numbers come from "
                f"`{results_dir}/{benchmark}/{model}/<method>/<Record>.json`.") if lat else (
                f"FLOPs: one sample's whole generation (FlopCounterMode). Rows come from "
                f"`{results_dir}/{benchmark}/{model}/<method>/<Record>.json`.")
        text = f"## {benchmark} on {MODEL_NAMES.get(model, model)}\n\n{build_table(records)}\n\n{note}\n"
        out = out_dir / f"{benchmark}_{model}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        written.append(out)
        print(text)
    if not groups:
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
