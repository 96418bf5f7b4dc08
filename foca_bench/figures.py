"""The paper's figures, drawn from records and traces only: `python -m foca_bench.figures` (run by `make tables`).

PNG and PDF per figure under `results/figures/`, each with a `.sources.txt` naming the record and trace files
its numbers come from:

- `forecast_error_<model>`: relative L2 forecast error per step of each method (paper Figure 1b), obtained by
  `methods.replay` of each method's schedule over the traced full-compute trajectory of every site (open loop:
  full steps see the true features), averaged over sites.
- `heun_ablation_<benchmark>_<model>`: BDF2-only vs FoCa quality against FLOPs speed-up (paper Figure 7).
- `stiffness_<model>`: local truncation error and stiffness index across steps (paper Figure 8a), and
  `ten_step_error_<model>`: the error of ten forecast steps started after full computation up to timesteps 30, 20
  and 10 (sampling-order steps T-30, T-20, T-10) for TaylorSeer and FoCa (paper Figure 8b). The paper does not
  define its LTE and stiffness index; foca-bench uses, per site with ΔF_i = F_{i+1} - F_i on the step axis,
      LTE_i = ||F_{i+1} - 2 F_i + F_{i-1}|| / ||F_i||   (the local error of one linear-extrapolation step),
      S_i = ||ΔF_i - ΔF_{i-1}|| / ||ΔF_{i-1}||          (h times a local Lipschitz estimate of dF/dt),
  the median over sites (docs/sweeps.md).
- `frontier_<benchmark>_<model>`: quality against FLOPs speed-up per method.

The traced trajectory is the full-compute run's (`method=none trace=true`; the toy sweep's DDIM row traces).
Records come from `foca_bench.results.load` (one DataFrame row each), display names from `foca_bench.names`.
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import pandas as pd

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"axes.titlesize": 9})
import torch  # noqa: E402

import methods  # noqa: E402
from foca_bench.names import METRIC_NAMES, MODEL_NAMES  # noqa: E402
from foca_bench.results import load, missing  # noqa: E402

# Methods compared on a trace (Figure 1b) and their schedules.
FORECASTERS = {
    "FORA": ("fora", {}),
    "TaylorSeer": ("taylorseer", {}),
    "FoCa": ("foca", {}),
    "FoCa (slope=local)": ("foca", {"slope": "local"}),
    "BDF2-only": ("foca", {"corrector": "none"}),
}
QUALITY = ("fid", "image_reward", "vbench", "psnr", "class_acc", "rel_l2")  # a benchmark's headline metric


def _site_tensors(trace: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in trace.items() if k not in ("times", "full")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per step of (T, ...) tensors."""
    a, b = a.flatten(1), b.flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


def forecast_errors(trace: dict[str, torch.Tensor], N: int, warmup: int = 1) -> dict[str, torch.Tensor]:
    """Per-step relative error (mean over sites) of each forecaster's schedule replayed over a full trace; NaN at
    full steps (exact by construction)."""
    sites = _site_tensors(trace)
    T = len(trace["times"])
    schedule = methods.build({"name": "reuse", "N": N, "warmup": warmup})  # the shared interval schedule
    full = torch.tensor([schedule.is_full(i) for i in range(T)])
    out = {}
    for name, (method, cfg) in FORECASTERS.items():
        errs = [_rel(methods.replay(method, v, trace["times"], full, N=N, time="step", **cfg), v)
                for v in sites.values()]
        out[name] = torch.stack(errs).mean(0).masked_fill(full, float("nan"))  # full steps: exact, not drawn
    return out


def stiffness(trace: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(LTE, stiffness index) at steps 1..T-2, median over sites (definitions in the module docstring)."""
    lte, index = [], []
    for v in _site_tensors(trace).values():
        flat = v.flatten(1)
        d = flat[1:] - flat[:-1]  # ΔF_i, (T-1, D)
        second = d[1:] - d[:-1]  # F_{i+1} - 2F_i + F_{i-1} at i = 1..T-2
        lte.append(second.norm(dim=1) / flat[1:-1].norm(dim=1).clamp_min(1e-12))
        index.append(second.norm(dim=1) / d[:-1].norm(dim=1).clamp_min(1e-12))
    return torch.stack(lte).median(0).values, torch.stack(index).median(0).values


def ten_step_errors(trace: dict[str, torch.Tensor], starts=(30, 20, 10), horizon: int = 10) -> dict[str, torch.Tensor]:
    """Relative error (mean over sites) of `horizon` forecast steps after full compute up to timestep k."""
    sites = _site_tensors(trace)
    T = len(trace["times"])
    out = {}
    for k in starts:
        i0 = T - round(k * T / 50)  # timestep k of 50 counts down: sampling-order step 50 - k
        steps = min(horizon, T - 1 - i0)
        if i0 < 1 or steps < 1:
            continue
        full = torch.tensor([i <= i0 for i in range(T)])
        for name, method in (("TaylorSeer", "taylorseer"), ("FoCa", "foca")):
            errs = [_rel(methods.replay(method, v, trace["times"], full, N=T, time="step")[i0 + 1: i0 + 1 + steps],
                         v[i0 + 1: i0 + 1 + steps]) for v in sites.values()]
            out[f"{name}, from timestep {k}"] = torch.stack(errs).mean(0)
    return out


def _save(fig, out_dir: Path, name: str, sources: list[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    plt.close(fig)
    (out_dir / f"{name}.sources.txt").write_text("\n".join(sources) + "\n")
    return paths


def _title(model: str) -> str:
    return MODEL_NAMES.get(model, model)


def _latest_traces(df: pd.DataFrame) -> dict[str, tuple[Path, Path]]:
    """model -> (record, trace) of the latest full-compute run with a trace."""
    traced = df[(df["method"] == "none") & df["trace"].map(lambda t: isinstance(t, str) and Path(t).is_file())]
    latest = traced.loc[traced.groupby("model")["mtime"].idxmax()] if len(traced) else traced
    return {r["model"]: (Path(r["record"]), Path(r["trace"])) for _, r in latest.iterrows()}


def trace_figures(df: pd.DataFrame, out_dir: Path, N: int = 5) -> list[Path]:
    from safetensors.torch import load_file

    written = []
    for model, (record, trace_path) in sorted(_latest_traces(df).items()):
        trace = load_file(str(trace_path))
        sources = [f"record: {record}", f"trace: {trace_path}"]
        T = len(trace["times"])

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, err in forecast_errors(trace, N).items():
            ax.plot(range(T), err.numpy(), label=name, lw=1.2)
        ax.set(yscale="log", xlabel="step (sampling order)", ylabel="relative L2 error (mean over sites)",
               title=f"Forecast error per step, N={N}\n{_title(model)}")
        ax.legend(fontsize=7)
        written += _save(fig, out_dir, f"forecast_error_{model}", sources)

        lte, index = stiffness(trace)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = range(1, T - 1)
        ax.plot(steps, lte.numpy(), color="C0", label="LTE")
        ax.set(xlabel="step (sampling order)", ylabel="LTE (relative)", yscale="log",
               title=f"Local truncation error and stiffness index\n{_title(model)}")
        ax2 = ax.twinx()
        ax2.plot(steps, index.numpy(), color="C3", label="stiffness index")
        ax2.set_ylabel("stiffness index", color="C3")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper center", fontsize=7)
        written += _save(fig, out_dir, f"stiffness_{model}", sources)

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (name, err) in enumerate(ten_step_errors(trace).items()):
            ax.plot(range(1, len(err) + 1), err.numpy(), label=name, color=f"C{i // 2}",
                    ls="--" if name.startswith("TaylorSeer") else "-", marker="o", ms=3)
        ax.set(yscale="log", xlabel="steps forecast after the last full step", ylabel="relative L2 error",
               title=f"Ten-step forecast error\n{_title(model)}")
        ax.legend(fontsize=7)
        written += _save(fig, out_dir, f"ten_step_error_{model}", sources)
    return written


def _quality_metric(group: pd.DataFrame) -> Optional[str]:
    return next((m for m in QUALITY if f"metrics.{m}" in group and group[f"metrics.{m}"].notna().any()), None)


def _spread_axis(ax, ys: list[float]) -> None:
    """A log scale when positive values span more than a factor of 20 (one diverged method hides the rest)."""
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")


def record_figures(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    for (benchmark, model), group in df.groupby(["benchmark", "model"], sort=True):
        metric = _quality_metric(group)
        if metric is None:
            continue
        series: dict[str, list[tuple[float, float, str]]] = {}
        for _, r in group.iterrows():
            value, speedup = r[f"metrics.{metric}"], r.get("profile.flops_speedup")
            if missing(value) or missing(speedup):
                continue
            name = r["label"].split(" (")[0]
            if r["method"] == "none":
                name = "DDIM (fewer steps)" if r["config.sampler.steps"] != 50 else "DDIM-50"
            elif r["method"] == "foca":  # FoCa's readings are separate series
                name += "".join(f" ({k})" for k in r["label"].rstrip(")").split(" (")[-1].split(", ")
                                if k.startswith(("slope=", "reading=")))
            series.setdefault(name, []).append((speedup, value, r["record"]))
        sources = [str(p) for pts in series.values() for *_, p in pts]
        ylabel = METRIC_NAMES.get(metric, metric)

        fig, ax = plt.subplots(figsize=(6.5, 4))
        markers = "osD^v<>phX*"
        for i, (name, pts) in enumerate(sorted(series.items())):  # tab20 + markers: no two series alike
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=name,
                    color=plt.cm.tab20(i % 20))
        ax.set(xlabel="FLOPs speed-up", ylabel=ylabel,
               title=f"Quality vs speed-up: {benchmark}\n{_title(model)}")
        _spread_axis(ax, [p[1] for pts in series.values() for p in pts])
        ax.legend(fontsize=6, ncol=2)
        written += _save(fig, out_dir, f"frontier_{benchmark}_{model}", sources)

        ablation = {k: v for k, v in series.items() if k in ("FoCa", "BDF2-only")}
        if len(ablation) == 2:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for name, pts in sorted(ablation.items()):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set(xlabel="FLOPs speed-up", ylabel=ylabel,
                   title=f"Heun correction ablation: {benchmark}\n{_title(model)}")
            _spread_axis(ax, [p[1] for pts in ablation.values() for p in pts])
            ax.legend()
            written += _save(fig, out_dir, f"heun_ablation_{benchmark}_{model}",
                             [str(p) for pts in ablation.values() for *_, p in pts])
    return written


def write_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    df = load(results_dir)
    written = record_figures(df, out_dir) + trace_figures(df, out_dir)
    if written:
        print(f"Figures: {len(written) // 2} written to {out_dir}")
    else:
        print(f"No figures: no records with metrics or traces under {results_dir}.")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/figures")
    args = parser.parse_args()
    print(json.dumps([str(p) for p in write_figures(args.results, args.out or args.results / "figures")], indent=1))


if __name__ == "__main__":
    main()
