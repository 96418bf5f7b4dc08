"""Adaptive FoCa's quality-vs-FLOPs frontier beside fixed-N FoCa, TaylorSeer, TeaCache and MagCache on toy_dit, with
bootstrap confidence intervals: `python -m foca_bench.frontier` (`make frontier`). TOY MODEL numbers.

Rows: DDIM-50 (full compute); FoCa at N = 3, 6 in each reading (`ours`, `cachedit`, `lab`); TaylorSeer at N = 3, 6;
TeaCache (`cache.l`) and diffusers' MagCache (`cache.threshold`) at two thresholds each; adaptive FoCa
(`method=foca_adaptive`, N = 10 the longest interval) at three tolerances. Each row is a `runner.run` of
benchmark=toy_fid (`frontier.samples` per class, the same seeds for every row; FLOPs of one sample as every table
counts them; no latency), its record under `results/frontier/` (existing records are reused; `force=true` reruns).
For each row: FID and RelL2 to full compute with their 95% bootstrap intervals, and the paired bootstrap verdict
against DDIM-50 (`foca_bench.significance`). Writes `results/frontier/frontier.{md,json,png}`.
Knobs: `+frontier.samples=10`; other arguments are Hydra overrides of every run.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from foca_bench.config import compose, split_knobs  # noqa: E402
from foca_bench.records import atomic_write, record_path  # noqa: E402
from foca_bench.runner import run  # noqa: E402
from foca_bench.significance import compare  # noqa: E402

ROWS = {  # series -> [(method, knobs)]
    "DDIM-50": [("none", {})],
    "FoCa ours": [("foca", {"N": n}) for n in (3, 6)],
    "FoCa cachedit": [("foca", {"N": n, "reading": "cachedit"}) for n in (3, 6)],
    "FoCa lab": [("foca", {"N": n, "reading": "lab"}) for n in (3, 6)],
    "TaylorSeer": [("taylorseer", {"N": n}) for n in (3, 6)],
    "TeaCache": [("teacache", {"l": l}) for l in (0.1, 0.3)],
    "MagCache (diffusers)": [("diffusers_magcache", {"threshold": t}) for t in (0.06, 0.24)],
    "Adaptive FoCa": [("foca_adaptive", {"tol": t, "N": 10}) for t in (0.02, 0.05, 0.15)],
}
METRICS = {"fid": "FID ↓", "rel_l2": "RelL2 to DDIM-50 ↓"}


def collect(overrides: list[str], samples: int) -> list[dict]:
    """Runs (or reuses) every row; returns one point per row with its metrics, intervals and verdicts."""
    base = ["benchmark=toy_fid", f"benchmark.samples_per_class={samples}", f"benchmark.batch_size={10 * samples}",
            "profile.latency=false", *overrides]
    jobs = [(series, m, k) for series, rows in ROWS.items() for m, k in rows]
    done = []
    for series, method, knobs in tqdm(jobs, desc="<frontier> runs", unit="run"):
        cfg = compose(*base, f"method={method}", *(f"cache.{k}={v}" for k, v in knobs.items()))
        cfg.results_dir = str(Path(cfg.results_dir) / "frontier")
        record = run(cfg)
        if "skipped" in record:
            raise RuntimeError(f"{series} {knobs}: {record['skipped']}; rerun when it is done.")
        path = record_path(Path(cfg.results_dir), "toy_fid", record["model"], method, record["run_id"])
        done.append((series, knobs, path, record))
    base_row = next((p, r) for s, _, p, r in done if s == "DDIM-50")
    points = []
    for series, knobs, path, rec in done:
        point = {"series": series, "knobs": knobs, "record": str(path), "flops_T": rec["profile"]["flops"] / 1e12,
                 "flops_speedup": rec["profile"]["flops_speedup"], "full_steps": rec["samples"]["full_steps"]}
        for name in METRICS:
            m = rec["metrics"][name]
            verdict = compare((path, rec), base_row, name) if series != "DDIM-50" else None
            point[name] = {"value": m["value"] or 0.0, "interval": m.get("interval"), "vs_ddim": verdict}
        points.append(point)
    return points


def markdown(points: list[dict]) -> str:
    lines = ["| Row | FLOPs(T) | Speed | Full steps | " + " | ".join(METRICS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for p in points:
        cells = []
        for name in METRICS:
            m, v = p[name], p[name]["vs_ddim"]
            lo, hi = m["interval"] or (m["value"], m["value"])
            mark = "" if v is None else (" ≈" if not v["distinguishable"] else f" (Δ {v['difference']:+.3g}, "
                                                                                 f"p={v['p']:.3f})")
            cells.append(f"{m['value']:.4g} [{lo:.4g}, {hi:.4g}]{mark}")
        knobs = ", ".join(f"{k}={v}" for k, v in p["knobs"].items())
        lines.append(f"| {p['series']} ({knobs}) | {p['flops_T']:.5f} | {p['flops_speedup']:.2f}× | "
                     f"{p['full_steps'] if p['full_steps'] is not None else '—'} | " + " | ".join(cells) + " |")
    return ("TOY MODEL (toy_dit, benchmark=toy_fid), 95% bootstrap intervals; ≈: not distinguishable from DDIM-50 "
            "by the paired bootstrap on the same seeds (docs/statistics.md).\n\n" + "\n".join(lines) + "\n")


def figure(points: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 4.2))
    markers = "osD^v<>phX*"
    for ax, name in zip(axes, METRICS):
        for i, series in enumerate(ROWS):
            pts = sorted((p for p in points if p["series"] == series), key=lambda p: p["flops_T"])
            xs = [p["flops_T"] for p in pts]
            ys = [p[name]["value"] for p in pts]
            err = [[max(0.0, y - (p[name]["interval"] or (y, y))[0]) for y, p in zip(ys, pts)],
                   [max(0.0, (p[name]["interval"] or (y, y))[1] - y) for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker=markers[i % len(markers)], capsize=3, label=series,
                        color=plt.cm.tab10(i % 10), linestyle="-" if len(pts) > 1 else "none")
        ax.set(xlabel="FLOPs per sample (T)", ylabel=METRICS[name])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("TOY MODEL toy_dit (benchmark=toy_fid): quality vs FLOPs, 95% bootstrap intervals")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)


def main(argv: list[str]) -> list[dict]:
    knobs = {"samples": 10}
    overrides = split_knobs(argv, "frontier", knobs)
    points = collect(overrides, knobs["samples"])
    out = Path(compose(*overrides).results_dir) / "frontier"
    atomic_write(out / "frontier.json", lambda tmp: tmp.write_text(json.dumps(points, indent=1) + "\n"))
    atomic_write(out / "frontier.md", lambda tmp: tmp.write_text(markdown(points)))
    figure(points, out / "frontier.png")
    print(markdown(points))
    print(f"Wrote {out / 'frontier.md'}, {out / 'frontier.json'}, {out / 'frontier.png'}")
    return points


if __name__ == "__main__":
    main(sys.argv[1:])
