"""Bad inputs through `run.py` as a user runs it (a subprocess): every case exits non-zero within seconds with one
message (no traceback) naming the key or file, writes no record or sample and leaves no claim behind (issue 17).

The cases run in parallel, four at a time (each is a Python start-up, ~5 s of CPU): the default suite runs ten (a
typo, refused settings, corrupt references, prompt lists and routers); the `slow` rest (`make test-slow`) adds the
other config values, missing files, the memory plan and the weights.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FLUX = ["model=flux", "model.size=tiny", "profile.benchmark=false"]

# (id, command-line arguments ({tmp} is the case's folder, files from `write_inputs` are under {files}), what the
# message must name, slow?)
CASES = [
    ("unknown-model", ["model=nope"], "nope", True),
    ("unknown-method", ["method=nope"], "nope", True),
    ("typo-knob", ["method=foca", "cache.n=3"], "cache.n", False),
    ("plus-typo-knob", ["method=foca", "+cache.n=3"], "cache.n", False),
    ("N-zero", ["method=foca", "cache.N=0"], "cache.N", True),
    ("wrong-type", ["method=foca", "cache.N=three"], "cache.N", True),
    ("negative-guidance", ["sampler.guidance_scale=-1"], "sampler.guidance_scale", False),
    ("zero-steps", ["sampler.steps=0"], "sampler.steps", True),
    ("claim-timeout", ["claim_timeout_s=0"], "claim_timeout_s", True),
    ("weights-kind", ["model.weights=bogus"], "model.weights", True),
    ("offload-value", ["model.offload=bogus"], "model.offload", False),
    ("offload-sequential", ["model.offload=sequential"], "model.offload", True),
    ("compile-mode-alone", ["model.compile_mode=max-autotune"], "model.compile_mode", True),
    ("flux-resolution", [*FLUX, "model.resolution=70"], "model.resolution=70", False),
    ("toy-fid-mismatch", ["model=flux", "model.size=tiny"], "benchmark=toy_fid", False),
    ("reference-unset", ["model=dit_xl_2", "benchmark=imagenet_fid"], "benchmark.reference_path", True),
    ("reference-absent", ["model=dit_xl_2", "benchmark=imagenet_fid", "benchmark.reference_path={tmp}/no.npz"],
     "no.npz", True),
    ("reference-garbage", ["model=dit_xl_2", "benchmark=imagenet_fid", "benchmark.reference_path={files}/garbage.npz"],
     "garbage.npz", False),
    ("reference-keys", ["model=dit_xl_2", "benchmark=imagenet_fid", "benchmark.reference_path={files}/keys.npz"],
     "arr_0", False),
    ("reference-shape", ["model=dit_xl_2", "benchmark=imagenet_fid", "benchmark.reference_path={files}/shape.npz"],
     "shape.npz", True),
    ("prompts-non-utf8", ["model=flux", "model.size=tiny", "benchmark=drawbench", "benchmark.metrics=[clip_score]",
                          "benchmark.prompts_path={files}/latin1.csv"], "latin1.csv", False),
    ("router-absent", ["method=l2c", "cache.router_path={tmp}/no_router.pt"], "no_router.pt", True),
    ("router-garbage", ["method=l2c", "cache.router_path={files}/garbage.pt"], "garbage.pt", False),
    ("prompts-unset", ["model=flux", "model.size=tiny", "benchmark=drawbench", "benchmark.metrics=[clip_score]"],
     "benchmark.prompts_path", True),
    ("prompts-no-column", ["model=flux", "model.size=tiny", "benchmark=drawbench", "benchmark.metrics=[clip_score]",
                           "benchmark.prompts_path={files}/columns.csv"], "columns.csv", True),
    ("lineage", [*FLUX, "sampler.lineage=dit"], "sampler.lineage", True),
    ("size", ["model.size=huge"], "model.size", True),
    ("limit-zero", ["benchmark.limit=0"], "benchmark.limit", True),
    ("shard-range", ["model=dit_xl_2", "benchmark=imagenet_fid", "benchmark.num_shards=2", "benchmark.shard=5"],
     "benchmark.shard", True),
    ("profile-batch", ["profile.batch_size=0"], "profile.batch_size", True),
    ("order-too-high", ["method=taylorseer", "cache.O=4", "cache.N=5", "sampler.steps=8"], "cache.O", True),
    ("dit-resolution", ["model=dit_xl_2", "model.resolution=100"], "model.resolution=100", True),
    ("video-frames", ["model=hunyuan_video", "model.size=tiny", "profile.benchmark=false", "model.frames=6"],
     "model.frames", True),
    ("memory-plan", [*FLUX, "method=foca", "model.memory_budget_gb=0.000001"], "memory plan", True),
    ("weights-absent", ["model=dit_xl_2", "model.path={tmp}/no_weights", "profile.benchmark=false"], "no_weights",
     True),
    ("weights-corrupt", ["model=dit_xl_2", "model.path={files}/broken_dit", "profile.benchmark=false"],
     "broken_dit", True),
]


def write_inputs(files: Path) -> None:
    """The damaged inputs the cases point at."""
    files.mkdir(parents=True, exist_ok=True)
    (files / "garbage.npz").write_bytes(b"not a zip file" * 10)
    (files / "garbage.pt").write_bytes(b"not a checkpoint" * 10)
    np.savez(files / "keys.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(files / "shape.npz", arr_0=np.zeros((2, 8, 8), np.float32))
    (files / "latin1.csv").write_bytes("Prompts,Category\nun caf\xe9 cr\xe8me,Colors\n".encode("latin-1"))
    (files / "columns.csv").write_text("Text,Category\na cat,Colors\n")
    transformer = files / "broken_dit" / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    (transformer / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", "num_layers": ')


def run_case(args: list[str], tmp: Path, files: Path) -> tuple[int, str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [a.format(tmp=tmp, files=files) for a in args]
    command = [sys.executable, "run.py", *argv, f"results_dir={tmp}/results", f"hydra.run.dir={tmp}/hydra",
               "device=cpu", "profile.latency=false", "benchmark.samples_per_class=1"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def run_all(slow: bool, root: Path) -> dict:
    files = root / "files"
    write_inputs(files)
    cases = [c for c in CASES if c[3] == slow]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {c[0]: pool.submit(run_case, c[1], root / c[0], files) for c in cases}
    return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return root, run_all(False, root)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_slow")
    return root, run_all(True, root)


def test_the_table_covers_the_issue():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,args,names,is_slow",
                         [pytest.param(*c, marks=[pytest.mark.slow] if c[3] else [], id=c[0]) for c in CASES])
def test_bad_input_fails_fast_and_clean(request, name, args, names, is_slow):
    root, outcomes = request.getfixturevalue("slow" if is_slow else "fast")
    code, output, seconds = outcomes[name]
    assert code != 0, output[-2000:]
    assert names in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert seconds < 120, f"{name} took {seconds:.0f} s"
    results = root / name / "results"
    left = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    assert not left, f"{name} left {left} (a record, a sample or a claim)"
