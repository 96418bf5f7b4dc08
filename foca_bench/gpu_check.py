"""One-command GPU check (`make gpu-check`): the paper's models at their sizes, random weights, no network, eager
and compiled, latency (CUDA events), peak memory and cache bytes, and our latency/FLOPs ratios beside the paper's.

`python3 -m foca_bench.gpu_check` on one H200-class GPU, within 8 minutes (a time budget skips what would not
fit, and says so in the table):
- FLUX.1-dev's architecture at 1024x1024, bf16: none, FoCa N=5/7, TaylorSeer N=4/5 (O=2), FORA N=3, TeaCache
  (l=0.8);
- DiT-XL/2 at 256x256 (float32, CFG): none, FoCa N=3/5;
- HunyuanVideo's architecture at 480x640 with `--frames` frames (9 by default; the paper's 65 take minutes), bf16:
  none, FoCa N=7;
each 50 steps at batch 1, eager, and compiled (`model.compile=inductor model.compile_mode=reduce-overhead`:
every step of `none`, FoCa, TaylorSeer and FORA one CUDA graph; `foca_bench/fused.py`). Latency: whole
generations interleaved round by round with `none` (`profiling.measure_interleaved`), medians, cells marked by
`profiling.latency_mark`; FLOPs from meta-device counts per full and skipped step and each schedule (TeaCache's:
its full steps in the run, its skipped steps counted as free, < 0.2% of a full step); the paper's ratio is its
latency speed-up over its FLOPs speed-up (`results/paper/*.yaml`). Writes `results/gpu_check/gpu_check_<time>.md`
and `.json` (and copies both to `--copy-to`, e.g. the device tool's $OUT).

The GPU machine's python has torch but not diffusers, hydra-core, omegaconf or antlr4: `make gpu-wheels` (here,
with network) downloads them as pure-Python wheels into `.gpu-wheels/`, and this module installs them from there
offline (`pip install --no-index --target`) when they are missing. Without a GPU it exits in seconds, unless told
`--device cpu` (the tests' dry run: `--device cpu --size tiny --steps 4 --backend aot_eager`).
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".gpu-wheels"
SITE = Path(os.environ.get("FOCA_GPU_SITE", "/tmp/foca-gpu-site"))
NEEDED = ("diffusers", "hydra", "omegaconf", "antlr4")  # import names the check needs beyond the machine's python
STEPS = 50
BUDGET_S = 450.0  # the check's own time (the 8-minute target leaves room for starting python and the machine)

# blocks in the order they run; a block starts only while its reserve fits in what is left of the budget
# (model, mode, reserve seconds, rows: (method, knobs))
BLOCKS = [
    ("flux", "eager", 100, [("none", {}), ("foca", {"N": 5}), ("foca", {"N": 7}), ("taylorseer", {"N": 4, "O": 2}),
                            ("taylorseer", {"N": 5, "O": 2}), ("fora", {"N": 3}), ("teacache", {"l": 0.8})]),
    ("dit_xl_2", "eager", 30, [("none", {}), ("foca", {"N": 3}), ("foca", {"N": 5})]),
    ("dit_xl_2", "compiled", 120, [("none", {}), ("foca", {"N": 3}), ("foca", {"N": 5})]),
    ("hunyuan_video", "eager", 60, [("none", {}), ("foca", {"N": 7})]),
    ("flux", "compiled", 200, [("none", {}), ("foca", {"N": 5}), ("foca", {"N": 7})]),
    ("hunyuan_video", "compiled", 200, [("none", {}), ("foca", {"N": 7})]),
]
DISPLAY = {"none": "none", "foca": "FoCa", "taylorseer": "TaylorSeer", "fora": "FORA", "teacache": "TeaCache"}
MODEL_DISPLAY = {"flux": "FLUX.1-dev", "dit_xl_2": "DiT-XL/2", "hunyuan_video": "HunyuanVideo"}


def require_device(device: str) -> None:
    """Exits with a clear message when the GPU sizes are asked for and no CUDA device is visible."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False), and its sizes (FLUX.1-dev "
                 "at 1024x1024, HunyuanVideo, DiT-XL/2) need one: run it on the lent GPU machine (`make gpu-check`). "
                 "A CPU dry run at tiny sizes: `python -m foca_bench.gpu_check --device cpu --size tiny --steps 4 "
                 "--backend aot_eager`.")


def ensure_packages(wheels: Path = WHEELS, site: Path = SITE) -> None:
    """Makes diffusers, hydra-core, omegaconf and antlr4 importable: installs the wheels `make gpu-wheels` put in
    `wheels` into `site` (offline) if any is missing, and puts `site` on the path."""
    if all(importlib.util.find_spec(name) for name in NEEDED):
        return
    found = sorted(wheels.glob("*.whl"))
    if not found:
        sys.exit(f"gpu-check: this python lacks {', '.join(n for n in NEEDED if not importlib.util.find_spec(n))} "
                 f"and {wheels} holds no wheels: run `make gpu-wheels` where there is network, and carry "
                 f"{wheels.name} to this machine.")
    if not (site / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], check=True)
        (site / ".installed").touch()
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()


# -- the check ----------------------------------------------------------------------------------------------------
def overrides(model: str, size: str, frames: int) -> list[str]:
    base = [f"model={model}"]
    if size == "tiny":
        return [*base, "model.size=tiny"]
    return [*base, "model.weights=random", *([f"model.frames={frames}"] if model == "hunyuan_video" else [])]


def label(name: str, knobs: dict) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in knobs.items())
    return DISPLAY[name] + (f" ({inner})" if inner else "")


class Check:
    """One model on the device: its adapter, its meta-device twin for FLOPs, and timing blocks."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        import torch

        from foca_bench.adapters import build_adapter
        from foca_bench.config import compose, validate

        self.model, self.args = model, args
        self.overrides = overrides(model, args.size, args.frames)
        self.cfg = compose(*self.overrides, f"sampler.steps={args.steps}")
        validate(self.cfg)
        with torch.device(args.device):  # random weights initialised on the device: seconds, not minutes
            self.adapter = build_adapter(self.cfg.model, args.device)
        self.meta = build_adapter(compose(*self.overrides, "model.weights=meta").model, "meta")
        self.device = torch.device(args.device)
        self.conditions = self.adapter.example_conditions(1)  # class 0 or the example prompt
        self.noise = self.adapter.make_noise([0])
        self.guidance = self.cfg.sampler.guidance_scale or self.cfg.model.guidance_scale
        self._flops: dict = {}
        m = self.adapter.cfg  # the config as built (a tiny size merged in)
        frames = f", {m.frames} frames" if "frames" in m else ""
        tiny = " (tiny)" if m.size == "tiny" else ""
        self.display = f"{MODEL_DISPLAY[model]}{tiny} {m.resolution}x{m.get('width', m.resolution)}{frames} {m.dtype}"

    def cache(self, name: str, knobs: dict):
        """The method's validated config (the model's warm-up and per-model knobs such as TeaCache's polynomial)."""
        from foca_bench.config import compose, validate

        cfg = compose(*self.overrides, f"method={name}", f"sampler.steps={self.args.steps}",
                      *[f"cache.{k}={v}" for k, v in knobs.items()])
        return validate(cfg)

    def generate(self, cache, backend, mode, stats: dict = None) -> None:
        import methods
        from foca_bench.fused import build_engine

        method = methods.build(cache)
        with build_engine(method, self.adapter.sites(), backend, mode, measure_cache=stats is not None) as engine:
            self.adapter.generate(engine, self.noise, self.args.steps, self.guidance, **self.conditions)
        if stats is not None:
            stats.update(full_steps=engine.full_steps, cache_bytes=engine.cache_bytes_peak)

    def step_flops(self, name: str) -> tuple[float, float]:
        """(full, skipped) FLOPs of one step of `name` on the meta device; TeaCache's skipped step counts as 0."""
        import methods
        from foca_bench.hooks import CacheEngine
        from foca_bench.profiling import count_flops

        def count(cache: dict, steps: int) -> int:
            def go() -> None:
                with CacheEngine(methods.build(cache), self.meta.sites()) as engine:
                    self.meta.generate(engine, self.meta.make_noise([0]), steps, self.guidance,
                                       **self.meta.example_conditions(1))

            return count_flops(go)

        if "full" not in self._flops:
            self._flops["full"] = count({"name": "none"}, 1)
        full = self._flops["full"]
        if name in ("none", "teacache"):
            return full, 0.0
        if name not in self._flops:
            self._flops[name] = count({"name": name, "N": 99, "warmup": 0}, 2) - full
        return full, self._flops[name]

    def block(self, mode: str, rows: list[tuple[str, dict]]) -> list[dict]:
        import torch

        from foca_bench.profiling import latency_mark, measure_interleaved

        backend = self.args.backend if mode == "compiled" else None
        cuda_mode = self.args.mode or ("reduce-overhead" if self.device.type == "cuda" else None)
        mode_kw = cuda_mode if backend == "inductor" else None
        caches = {label(n, k): self.cache(n, k) for n, k in rows}
        none = label("none", {})
        stats: dict[str, dict] = {}
        for name, cache in caches.items():  # warm-up round: compilation, peak memory, cache bytes, full steps
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            stats[name] = {}
            self.generate(cache, backend, mode_kw, stats[name])
            if self.device.type == "cuda":
                stats[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
        fns = {name: (lambda c=cache: self.generate(c, backend, mode_kw)) for name, cache in caches.items()}
        times = measure_interleaved(fns, self.device, warmup=0, repeats=self.args.repeats, time_cap_s=20.0)
        out = []
        for (method, knobs), (name, cache) in zip(rows, caches.items()):
            full_f, skip_f = self.step_flops(method)
            n_full = stats[name]["full_steps"]
            flops_up = self.args.steps * full_f / (n_full * full_f + (self.args.steps - n_full) * skip_f)
            mine, base = times[name]["samples_s"], times[none]["samples_s"]
            latency_up = times[none]["median_s"] / times[name]["median_s"]
            out.append({"model": self.model, "display": self.display, "mode": mode, "method": method, "knobs": knobs,
                        "row": name,
                        "latency_s": times[name]["median_s"], "latency_spread": times[name]["spread"],
                        "samples_s": mine, "none_samples_s": base, "latency_speedup": latency_up,
                        "flops_speedup": flops_up, "ratio": latency_up / flops_up,
                        "mark": latency_mark(mine, base, flops_up),
                        "paper_ratio": paper_ratio(self.model, method, knobs), **stats[name]})
        return out

    def close(self) -> None:
        import gc

        import torch

        del self.adapter, self.meta
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def paper_ratio(model: str, method: str, knobs: dict):
    """The paper's latency speed-up over its FLOPs speed-up for this row (results/paper/*.yaml), or None."""
    from foca_bench.tables import load_paper_tables, row_run

    paper = load_paper_tables().get(model)
    if paper is None:
        return None

    def find(name: str, wanted: dict):  # the first paper row that runs `name` with `wanted`
        for r in paper["rows"]:
            run = row_run(paper["table"], r["row"], model)
            if (run["method"] == name and run["steps"] == STEPS
                    and all(run["cache"].get(k) == v for k, v in wanted.items())):
                return r["paper"]
        return None

    row, base = find(method, knobs), find("none", {})
    if row is None or not row.get("flops_speedup"):
        return None
    latency = row.get("latency_speedup")
    if latency is None and row.get("latency_s") and base and base.get("latency_s"):
        latency = base["latency_s"] / row["latency_s"]  # DiT's table prints latencies only
    return None if latency is None else latency / row["flops_speedup"]


def table(rows: list[dict], skipped: list[str], meta: dict) -> str:
    head = ["Model", "Method", "Mode", "Latency (s)", "Latency speed-up", "FLOPs speed-up", "Ratio (ours)",
            "Ratio (paper)", "Peak memory (GiB)", "Cache (GiB)", "Full steps"]
    lines = [f"GPU check, {meta['date']}, commit {meta['commit']}: {meta['device']}, torch {meta['torch']}, "
             f"{meta['steps']} steps, batch 1, random weights, TF32 matmuls {meta['tf32']}; compiled = "
             f"torch.compile(backend={meta['backend']}, mode={meta['mode']}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gib = lambda b: "—" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    for r in rows:
        paper = "—" if r["paper_ratio"] is None or r["method"] == "none" else f"{r['paper_ratio']:.2f}"
        lines.append("| " + " | ".join([
            r["display"], r["row"], r["mode"], f"{r['latency_s']:.3f}",
            f"{r['latency_speedup']:.2f}x{r['mark']}", f"{r['flops_speedup']:.2f}x", f"{r['ratio']:.2f}", paper,
            gib(r.get("peak_bytes")), gib(r["cache_bytes"]), f"{r['full_steps']}/{meta['steps']}"]) + " |")
    notes = ["Ratio = latency speed-up / FLOPs speed-up against `none` in the same mode; paper: its Tables 1-3 "
             "(DiT's from its latency column). Latency: medians of whole generations interleaved with `none` "
             "(CUDA events); † samples spread more than 5%, § a speed-up beyond the FLOPs one (README). Peak "
             "memory: the device's peak allocation in the method's warm-up generation; cache: the feature cache "
             "at its peak. TeaCache's skipped steps count as 0 FLOPs."]
    if skipped:
        notes.append(f"Not run (time budget): {', '.join(skipped)}; rerun with `--only {' '.join(skipped)}`.")
    return "\n".join(lines + [""] + notes) + "\n"


def run_check(args: argparse.Namespace, blocks=BLOCKS) -> Path:
    """Runs the blocks that fit the budget; writes and prints the table; returns the Markdown path."""
    from datetime import datetime, timezone

    import torch

    from foca_bench.fused import allow_many_methods
    from foca_bench.records import atomic_write, atomic_write_json, environment

    allow_many_methods()  # every method's graphs on one model in this process
    started = time.perf_counter()
    wanted = set(args.only) if args.only else None
    rows, skipped, checks = [], [], {}
    for model, mode, reserve, block_rows in blocks:
        name = f"{model}:{mode}"
        if wanted is not None and name not in wanted:
            continue
        if time.perf_counter() - started + reserve > args.budget:
            skipped.append(name)
            continue
        print(f"<gpu-check> {name}: {', '.join(label(n, k) for n, k in block_rows)}", flush=True)
        if model not in checks:
            for other in list(checks):
                checks.pop(other).close()
            checks[model] = Check(model, args)
        rows += checks[model].block(mode, block_rows)
    for check in checks.values():
        check.close()
    env = environment()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": env["git_commit"][:12],
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU", "torch": torch.__version__,
            "steps": args.steps, "backend": args.backend, "tf32": torch.backends.cuda.matmul.allow_tf32,
            "mode": args.mode or ("reduce-overhead" if args.device == "cuda" else None)}
    text = table(rows, skipped, meta)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"gpu_check_{stamp}.md"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    atomic_write_json(path.with_suffix(".json"), {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                                  "environment": env, "rows": rows, "skipped": skipped,
                                                  "seconds": time.perf_counter() - started})
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for p in (path, path.with_suffix(".json")):
            shutil.copy(p, args.copy_to / p.name)
    print(text)
    print(f"<gpu-check> {time.perf_counter() - started:.0f} s; {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: the CPU dry run's models")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--frames", type=int, default=9, help="HunyuanVideo's frame count (the paper: 65)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode; default reduce-overhead on a GPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds at least (after one warm-up round)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds; blocks that would not fit are skipped")
    parser.add_argument("--only", nargs="*", default=None, help="blocks to run, e.g. flux:eager dit_xl_2:compiled")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the table and record here")
    parser.add_argument("--preflight", action="store_true", help="only check for a GPU (exits 1 without one)")
    args = parser.parse_args()
    require_device(args.device)
    if args.preflight:
        return
    ensure_packages()
    run_check(args)


if __name__ == "__main__":
    main()
