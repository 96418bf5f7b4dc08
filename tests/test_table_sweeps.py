"""The paper's tables as sweeps, end to end on tiny models: `experiment=table1_flux` (DrawBench, CLIP score),
`table2_hunyuan` (VBench) and `table3_dit` (ImageNet FID/IS) with `model.size=tiny` and tiny benchmarks (a few
prompts or classes, random metric networks in their real formats) generate, score, profile and write a record for
each row they run, and `make tables` (`foca_bench.tables.write_tables`) then fills the paper's rows from those
records. The default test runs two rows of each table at 3 steps; the slow one every row of every table at its own
steps, and checks that no paper row with an implementation is left `paper only`. TINY MODELS: the numbers say
nothing about the paper's."""

import csv
import json
import subprocess
from pathlib import Path

import pytest

from foca_bench import REPO_DIR
from foca_bench.runner import run
from foca_bench.results import load
from foca_bench.tables import load_paper_tables, matches, row_run, write_tables
from tests.conftest import make_cfg
from tests.random_nets import save_random_inception, save_tiny_clip

# a row of ours and an external or adaptive one per table, run at 3 steps (a 50-step tiny FLUX generation takes
# seconds of CPU, and a row several generations)
FAST_ROWS = {"table1_flux": ("foca_n5", "dbcache_f4b4"), "table2_hunyuan": ("fora_n5", "teacache_l04"),
             "table3_dit": ("foca_n3", "delta_dit_n2")}
FAST = ("sampler.steps=3", "profile.baseline_steps=null")
MODELS = {"table1_flux": "flux", "table2_hunyuan": "hunyuan_video", "table3_dit": "dit_xl_2"}
BENCHMARKS = {"table1_flux": "drawbench", "table2_hunyuan": "vbench", "table3_dit": "imagenet_fid"}
QUICK = ("profile.warmup=0", "profile.repeats=1")
# Table 1's Δ-DiT rows cache FLUX.1-dev's 38 single blocks (`cache.blocks=38`); tiny FLUX has 2, so the slow sweep
# runs them with cache.blocks=2 and their records cannot take the paper's rows (their FLOPs: tests/test_flux.py)
TINY_BLOCKS = {"table1_flux/delta_dit_n2": ("cache.blocks=2",), "table1_flux/delta_dit_n3": ("cache.blocks=2",)}
NO_TINY_RECORD = {("table1_flux", "delta_dit")}
VBENCH_ENV = REPO_DIR / ".envs" / "vbench" / "bin" / "python"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny benchmark files, built for a table when its test first asks: 2 DrawBench prompts and a tiny CLIP; an
    ADM-format reference batch and a random Inception; 2 VBench prompts of temporal flickering and VBench's weight
    folder (None without the VBench environment)."""
    root = tmp_path_factory.mktemp("tables")
    built: dict = {}

    def build(table: str):
        if table not in built:
            built[table] = BUILDERS[table](root)
        return built[table]

    return build


def _drawbench(root: Path) -> tuple:
    with open(root / "drawbench.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Prompts", "Category"], ["a red car", "Colors"], ["two cats", "Counting"]])
    name, config, checkpoint = save_tiny_clip(root / "clip", steps=2)
    return (f"benchmark.prompts_path={root / 'drawbench.csv'}", "benchmark.metrics=[clip_score]",
            f"benchmark.clip_model={name}", f"benchmark.clip_path={checkpoint}", f"benchmark.clip_config_path={config}")


def _imagenet(root: Path) -> tuple:
    import numpy as np

    np.savez(root / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    return (f"benchmark.reference_path={root / 'ref.npz'}", "benchmark.samples_per_class=1", "benchmark.limit=2",
            f"benchmark.inception_path={save_random_inception(root / 'inception.pth')}", "benchmark.batch_size=2",
            "benchmark.isc_splits=2")


def _vbench(root: Path):
    if not VBENCH_ENV.is_file():
        return None
    from evaluation.vbench_score import package_file

    subprocess.run([str(VBENCH_ENV), "-m", "tests.build_vbench_weights", str(root / "vbench")], check=True,
                   cwd=REPO_DIR, capture_output=True)
    info = json.loads(package_file("VBench_full_info.json").read_text())
    (root / "prompts.json").write_text(json.dumps([e for e in info if e["dimension"] == ["temporal_flickering"]][:2]))
    return ("benchmark.dimensions=[temporal_flickering]", "benchmark.videos_per_prompt=1",
            f"benchmark.prompts_path={root / 'prompts.json'}", f"benchmark.vbench_cache_path={root / 'vbench'}")


BUILDERS = {"table1_flux": _drawbench, "table2_hunyuan": _vbench, "table3_dit": _imagenet}


def run_rows(table: str, rows, files, results: Path, *overrides: str) -> list[dict]:
    """Runs rows of `table` as the sweep does (`experiment=<table> +row/<table>=<row>`), tiny."""
    benchmark = files(table)
    if benchmark is None:
        pytest.skip("needs `make env-vbench` (make test builds it)")
    return [run(make_cfg(f"experiment={table}", f"+row/{table}={row}", "model.size=tiny", *QUICK, *benchmark,
                         *TINY_BLOCKS.get(f"{table}/{row}", ()), *overrides, f"results_dir={results}"))
            for row in rows]


def check_records(table: str, records: list[dict]) -> None:
    metric = {"table1_flux": "clip_score", "table2_hunyuan": "temporal_flickering", "table3_dit": "fid"}[table]
    for rec in records:
        assert rec["benchmark"] == BENCHMARKS[table] and rec["model"] == MODELS[table]
        assert rec["profile"]["flops"] > 0 and rec["profile"]["latency_s"] > 0 and rec["samples"]["count"] >= 2
        assert rec["metrics"][metric]["value"] is not None, (rec["method"], rec["metrics"])


def rendered(table: str, results: Path) -> str:
    """`make tables` on `results`: the Markdown of the table's (benchmark, model) group."""
    written = write_tables(results, results / "tables")
    (path,) = [p for p in written if p.stem == f"{BENCHMARKS[table]}_{MODELS[table]}"]
    return path.read_text()


def paper_rows_filled(text: str, table: str) -> dict[str, str]:
    """The paper table's rows in a rendered table: label -> its record's run id, or `paper only`."""
    rows = {}
    for row in load_paper_tables()[MODELS[table]]["rows"]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {row['label']} |"))
        rows[row["label"]] = line.rstrip(" |").rsplit("| ", 1)[1]
    return rows


@pytest.mark.parametrize("table", sorted(FAST_ROWS))
def test_two_rows_of_each_table_end_to_end(files, tmp_path, table):
    records = run_rows(table, FAST_ROWS[table], files, tmp_path, *FAST)
    check_records(table, records)
    text = rendered(table, tmp_path)
    assert all(f"`{rec['run_id']}`" in text for rec in records)  # at 3 steps they are rows of ours, beside the paper's


@pytest.mark.slow
@pytest.mark.parametrize("table", sorted(FAST_ROWS))
def test_every_row_of_each_table_end_to_end_and_no_implemented_row_is_paper_only(files, tmp_path, table):
    """Every conf/row/<table>/*.yaml, as `python run.py -m experiment=<table>` sweeps them, at their own steps (tiny;
    tens of minutes a table on 2 CPU cores): each record takes the paper row it reproduces, and every paper row with
    an implementation has one."""
    rows = sorted(p.stem for p in (REPO_DIR / "conf" / "row" / table).glob("*.yaml"))
    records = run_rows(table, rows, files, tmp_path)
    check_records(table, records)
    filled = paper_rows_filled(rendered(table, tmp_path), table)
    paper = load_paper_tables()[MODELS[table]]["rows"]
    df = load(tmp_path).set_index("run_id", drop=False)
    for row, rec in zip(rows, records):
        if f"{table}/{row}" not in TINY_BLOCKS:
            r = df.loc[rec["run_id"]]
            (label,) = [p["label"] for p in paper if matches(r, row_run(table, p["row"], MODELS[table]))]
            assert filled[label] == f"`{rec['run_id']}`", label
    for row in paper:  # every paper row names its run (conf/row): none is `paper only` but those without a record
        if (table, row_run(table, row["row"], MODELS[table])["method"]) not in NO_TINY_RECORD:
            assert filled[row["label"]] != "paper only", row["label"]


@pytest.mark.parametrize("table", sorted(FAST_ROWS))
def test_flops_only_sweeps_leave_out_exactly_the_rows_that_need_weights(table):
    """`make flops-*` sweep `experiment=<table> profile=flops_only` with an exclude glob: it leaves out exactly the
    rows whose method decides from feature values (refused on the meta device), and every other row validates."""
    import re
    from fnmatch import fnmatch

    from foca_bench.config import validate

    line = next(line for line in (REPO_DIR / "Makefile").read_text().splitlines()
                if f"experiment={table} profile=flops_only" in line)
    found = re.search(r"glob\(\*,exclude=\[(.*?)\]\)", line)
    excluded = found.group(1).split(",") if found else []
    for row in sorted(p.stem for p in (REPO_DIR / "conf" / "row" / table).glob("*.yaml")):
        cfg = make_cfg(f"experiment={table}", f"+row/{table}={row}", "profile=flops_only")
        if any(fnmatch(row, pattern) for pattern in excluded):
            with pytest.raises(ValueError, match="meta device"):
                validate(cfg)
        elif row.startswith(("l2c_", "smoothcache_")):  # need a learnt router / a calibration: refused naming the command
            with pytest.raises(ValueError, match="train_l2c|calibrate_smoothcache"):
                validate(cfg)
        else:
            validate(cfg)
