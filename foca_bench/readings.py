"""FoCa's readings beside the forecasting baselines on toy_dit: `python -m foca_bench.readings` (`make readings`).

The question (issue 13): which reading of the paper's eqs. 6-8 (`cache.reading`, docs/methods.md) reproduces its
central claim, "FoCa (arXiv:2508.16211) beats TaylorSeer as N grows", and where. Rows: FoCa `ours` (slope=local
and slope=full), `cachedit` and `lab`; FORA; TaylorSeer O=1 and O=2 with the official derivative start (its default
`cache.first_enhance`); at N = 3, 5, 7 and warmup = 1 (toy_dit's) and 2. Two measurements:

- open loop: the full-compute trajectory of every cache site is traced for `readings.trace_samples` samples (one
  batch; seeds by the benchmark's rule), each method is replayed over it (`methods.replay`: the live
  update/forecast code) on the interval schedule, and the error is the relative L2 of each skipped step's value to
  the true feature, averaged over skipped steps, samples (and CFG halves) and sites;
- closed loop: real generations through `runner.run` (records under `results/readings/`), `readings.samples`
  samples per class of benchmark=toy_fid; image RelL2 and PSNR to full compute from the same seeds.

A reading reproduces the claim in a setting when its error is at least 5% below the better TaylorSeer's at N = 5
and 7 (a tie is no win) and its ratio to it falls from N = 3 to 7. Writes `results/readings/readings.{md,json,png}`.
TOY MODEL numbers.
Knobs: `+readings.samples=10 +readings.trace_samples=10`; other arguments are Hydra overrides of every run
(`force=true` recomputes existing records).
"""

import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import methods
from foca_bench.config import compose, split_knobs, validate
from foca_bench.generation import generate, get_adapter, resolve_device
from foca_bench.identity import run_id
from foca_bench.records import atomic_write, atomic_write_json, environment, record_path
from foca_bench.runner import run

NS = (3, 5, 7)
WARMUPS = (1, 2)
ROWS = {  # label -> (method, knobs)
    "FoCa ours, slope=local": ("foca", {"reading": "ours", "slope": "local"}),
    "FoCa ours, slope=full": ("foca", {"reading": "ours", "slope": "full"}),
    "FoCa cachedit": ("foca", {"reading": "cachedit"}),
    "FoCa lab": ("foca", {"reading": "lab"}),
    "FORA": ("fora", {}),
    "TaylorSeer O=1": ("taylorseer", {"O": 1}),
    "TaylorSeer O=2": ("taylorseer", {"O": 2}),
}
READINGS = [r for r in ROWS if r.startswith("FoCa")]
TAYLORSEER = ("TaylorSeer O=1", "TaylorSeer O=2")
WIN = 0.95  # a reading beats TaylorSeer where its error is at most this fraction of the better TaylorSeer's


def _schedule(N: int, warmup: int, T: int) -> torch.Tensor:
    """The interval schedule FoCa and TaylorSeer share (full at i < warmup or (i - warmup) % N == 0)."""
    plan = methods.build({"name": "foca", "N": N, "warmup": warmup})
    return torch.tensor([plan.is_full(i, T) for i in range(T)])


def trace(overrides: list[str], samples: int) -> tuple[dict[str, torch.Tensor], Path]:
    """Full-compute trajectories of every site for `samples` samples (cached under results/readings/traces/)."""
    from safetensors.torch import load_file, save_file

    cfg = compose("method=none", *overrides)
    validate(cfg)
    labels = torch.arange(samples) % cfg.model.num_classes
    seeds = [cfg.benchmark.seed + i for i in range(samples)]
    key = {"model": OmegaConf.to_container(cfg.model, resolve=True), "labels": labels.tolist(), "seeds": seeds,
           "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}
    path = Path(cfg.results_dir) / "readings" / "traces" / f"{cfg.model.name}_{run_id(key)}.safetensors"
    if path.is_file() and not cfg.force:
        return load_file(str(path)), path
    adapter = get_adapter(cfg.model, resolve_device(cfg.device))
    stats: dict = {}
    for _ in generate(adapter, methods.get("none").config_class(), OmegaConf.to_object(cfg.sampler),
                      [(seeds, {"class_labels": labels})], stats, desc="<readings: none> tracing", trace=True):
        pass
    tensors = {k: v.contiguous() for k, v in stats["trace"].items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return tensors, path


def open_loop(trace_: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean relative L2 forecast error over skipped steps, samples and sites: {row: {"w<warmup>/N<N>": error}}."""
    sites = [k for k in trace_ if k not in ("times", "full")]
    T = len(trace_["times"])
    errors: dict[tuple[str, str], list[torch.Tensor]] = {}
    for site in sites:  # one site in float64 at a time
        true = trace_[site].double()  # (T, B, ...)
        for warmup in WARMUPS:
            for N in NS:
                full = _schedule(N, warmup, T)
                for row, (method, knobs) in ROWS.items():
                    got = methods.replay(method, true, trace_["times"], full, N=N, warmup=warmup, time="step", **knobs)
                    diff, ref = (got - true)[~full].flatten(2), true[~full].flatten(2)
                    rel = (diff.norm(dim=2) / ref.norm(dim=2).clamp_min(1e-12)).mean()
                    errors.setdefault((row, f"w{warmup}/N{N}"), []).append(rel)
    out: dict[str, dict[str, float]] = {row: {} for row in ROWS}
    for (row, cell), rels in errors.items():
        out[row][cell] = float(torch.stack(rels).mean())
    return out


def closed_loop(overrides: list[str], samples: int) -> dict[str, dict[str, dict]]:
    """Real toy_fid generations: {row: {"w<warmup>/N<N>": {"rel_l2", "psnr", "full_steps", "reused", "record"}}}."""
    base = ["benchmark=toy_fid", f"benchmark.samples_per_class={samples}", f"benchmark.batch_size={10 * samples}",
            "profile.latency=false", "profile.flops=false", *overrides]
    jobs = [(row, warmup, N) for warmup in WARMUPS for N in NS for row in ROWS]
    out: dict[str, dict[str, dict]] = {row: {} for row in ROWS}
    existing = set(Path(compose(*base).results_dir, "readings").rglob("*.json"))  # records this run reuses
    for row, warmup, N in tqdm(jobs, desc="<readings> closed loop", unit="run"):
        method, knobs = ROWS[row]
        cfg = compose(*base, f"method={method}", f"cache.N={N}", f"cache.warmup={warmup}",
                      *(f"cache.{k}={v}" for k, v in knobs.items()))
        results = Path(cfg.results_dir) / "readings"
        cfg.results_dir = str(results)
        record = run(cfg)
        if "skipped" in record:
            raise RuntimeError(f"{row} (warmup={warmup}, N={N}): {record['skipped']}; rerun when it is done.")
        metrics, path = record["metrics"], record_path(results, "toy_fid", record["model"], method, record["run_id"])
        out[row][f"w{warmup}/N{N}"] = {
            "rel_l2": metrics["rel_l2"]["value"], "psnr": metrics["psnr"]["value"],
            "rel_l2_interval": metrics["rel_l2"].get("interval"), "psnr_interval": metrics["psnr"].get("interval"),
            "full_steps": record["samples"]["full_steps"], "reused": path in existing, "record": str(path)}
    return out


def verdict(errors: dict[str, dict[str, float]], warmup: int) -> dict[str, dict]:
    """Per reading: its ratio to the better TaylorSeer at each N, and whether it reproduces the claim."""
    out = {}
    for row in READINGS:
        ratios = [errors[row][f"w{warmup}/N{N}"] / min(errors[ts][f"w{warmup}/N{N}"] for ts in TAYLORSEER)
                  for N in NS]
        out[row] = {"ratios": ratios, "reproduces": ratios[1] <= WIN and ratios[2] <= WIN and ratios[2] < ratios[0]}
    return out


def _cell(x: Optional[float], fmt: str, interval: Optional[list] = None) -> str:
    """`x` in `fmt`, with ± the half-width of its 95% bootstrap interval where the record has one."""
    if x is None:
        return "—"
    return format(x, fmt) + ("" if not interval else f" ± {format((interval[1] - interval[0]) / 2, fmt)}")


def markdown(result: dict) -> str:
    cols = [f"w{w}/N{N}" for w in WARMUPS for N in NS]
    head = "| Method | " + " | ".join(f"warmup={c[1]}, N={c.split('N')[1]}" for c in cols) + " |\n"
    head += "|---|" + "---|" * len(cols) + "\n"

    def table(get, fmt, interval=lambda r, c: None) -> str:
        return head + "".join(f"| {row} | " + " | ".join(_cell(get(row, c), fmt, interval(row, c)) for c in cols)
                              + " |\n" for row in ROWS)

    closed = result["closed_loop"]
    reused = sum(cell["reused"] for cells in closed.values() for cell in cells.values())
    lines = [
        "# FoCa's readings beside FORA and TaylorSeer on toy_dit (TOY MODEL)\n",
        f"`{result['command']}` at commit {result['environment']['git_commit'][:7]}, {result['wall_s'] / 60:.1f} "
        f"min on {result['environment'].get('cpu_count', '?')} CPU(s). TaylorSeer uses the official derivative "
        f"start ({result['taylorseer_start']}). Open loop: {result['trace_samples']} traced samples "
        f"(`{result['trace']}`); closed loop: {result['closed_samples']} generated samples per run ({reused} of "
        f"{len(ROWS) * len(WARMUPS) * len(NS)} runs' records were already there and reused).\n",
        "## Open loop: mean relative L2 forecast error (skipped steps, samples, sites)\n",
        table(lambda r, c: result["open_loop"][r][c], ".4f"),
        "## Closed loop: image relative L2 to full compute\n",
        table(lambda r, c: closed[r][c]["rel_l2"], ".4f", lambda r, c: closed[r][c].get("rel_l2_interval")),
        "## Closed loop: image PSNR to full compute (dB)\n",
        table(lambda r, c: closed[r][c]["psnr"], ".2f", lambda r, c: closed[r][c].get("psnr_interval")),
        "Closed loop ±: half-width of the 95% bootstrap interval over samples (docs/statistics.md), where the "
        "record has one (records from before issue 19 have none).\n",
        f"## Verdict: reading / better TaylorSeer at N = 3 / 5 / 7 (✓: at most {WIN} at N = 5 and 7, falling with "
        "N)\n",
    ]
    verdict_table = "| Reading | " + " | ".join(f"{loop} loop, warmup={w}" for loop in ("open", "closed")
                                              for w in WARMUPS) + " |\n" + "|---|" + "---|" * 2 * len(WARMUPS) + "\n"
    for row in READINGS:
        cells = []
        for loop in ("open", "closed"):
            for w in WARMUPS:
                v = result["verdict"][loop][str(w)][row]
                cells.append(" / ".join(f"{r:.2f}" for r in v["ratios"]) + (" ✓" if v["reproduces"] else " ✗"))
        verdict_table += f"| {row} | " + " | ".join(cells) + " |\n"
    return "\n".join([*lines, verdict_table])


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(WARMUPS), figsize=(10, 10), sharex=True)
    loops = (("open loop: forecast rel. L2", lambda r, c: result["open_loop"][r][c]),
             ("closed loop: image rel. L2", lambda r, c: result["closed_loop"][r][c]["rel_l2"]))
    for i, (title, get) in enumerate(loops):
        for j, w in enumerate(WARMUPS):
            ax = axes[i][j]
            for k, row in enumerate(ROWS):
                style = "-" if row.startswith("FoCa") else "--"
                ax.plot(NS, [get(row, f"w{w}/N{N}") for N in NS], style, marker="osD^vx+"[k], label=row,
                        color=f"C{k}")
            ax.set(yscale="log", title=f"{title}, warmup={w}", xticks=NS)
    for j, w in enumerate(WARMUPS):  # the claim's measure: a reading's error over the better TaylorSeer's
        ax = axes[2][j]
        for k, row in enumerate(READINGS):
            for loop, style in (("open", "-"), ("closed", ":")):
                ratios = result["verdict"][loop][str(w)][row]["ratios"]
                ax.plot(NS, ratios, style, marker="osD^"[k], color=f"C{k}", label=f"{row}, {loop} loop")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(WIN, color="k", lw=0.8, ls="--")
        ax.set(ylim=(0.8, 3.5), xticks=NS, xlabel="N (interval between full steps)",
               ylabel="ratio (clipped at 3.5)", title=f"error / better TaylorSeer's, warmup={w}")
    axes[0][0].legend(fontsize=7)
    axes[2][0].legend(fontsize=6, ncol=2, loc="upper left")
    fig.suptitle("FoCa's readings vs FORA and TaylorSeer on toy_dit (TOY MODEL)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)


def main(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    # one thread: the toy model's matrices are too small for a second one to gain much, and on shared cores
    # its spin-waits made generation 6-8x slower (measured under load: 40 samples, 9.5 s vs 64 s)
    torch.set_num_threads(1)
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: list[str]) -> dict:
    started = time.perf_counter()
    knobs = {"samples": 10, "trace_samples": 10}
    overrides = ["model=toy_dit", *split_knobs(argv, "readings", knobs)]
    tensors, trace_path = trace(overrides, knobs["trace_samples"])
    print(f"<readings> open loop over {trace_path}")
    result = {"command": " ".join(["python -m foca_bench.readings", *argv]), "overrides": overrides,
              "trace": str(trace_path), "trace_samples": knobs["trace_samples"],
              "closed_samples": 10 * knobs["samples"],
              "taylorseer_start": "cache.first_enhance=null: warmup + 1, factors from full step `warmup` on",
              "open_loop": open_loop(tensors)}
    result["closed_loop"] = closed_loop(overrides, knobs["samples"])
    closed = {row: {c: v["rel_l2"] for c, v in cells.items()} for row, cells in result["closed_loop"].items()}
    result["verdict"] = {"open": {str(w): verdict(result["open_loop"], w) for w in WARMUPS},
                         "closed": {str(w): verdict(closed, w) for w in WARMUPS}}
    result["environment"] = {**environment(), "cpu_count": os.cpu_count()}
    result["wall_s"] = time.perf_counter() - started
    out = Path(compose(*overrides).results_dir) / "readings"
    atomic_write_json(out / "readings.json", result)
    atomic_write(out / "readings.md", lambda tmp: tmp.write_text(markdown(result)))
    figure(result, out / "readings.png")
    print(markdown(result))
    print(f"<readings> wrote {out / 'readings.md'}, readings.json and readings.png in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
