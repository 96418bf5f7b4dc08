# foca-bench. `make demo` and `make test` each work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := $(PY) run.py

.PHONY: install demo test test-slow toy-model tables flops-dit flops-flux bench clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# Plain PyPI torch: the CUDA build, which also runs on CPU-only machines.
	$(VENV)/bin/pip install --quiet torch torchvision
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

# The default job: full compute, FoCa (both slope readings and the BDF2-only ablation), TaylorSeer, FORA and
# reuse at N=3 and N=5 on the embedded toy_dit (conf/experiment/toy_dit.yaml: one job per conf/row/toy_dit/*.yaml,
# one process), then the Table-3-shaped table (Markdown + LaTeX) and the figures from the records.
demo: install
	$(RUN) -m experiment=toy_dit
	$(PY) -m foca_bench.tables

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# Retrains the shipped checkpoints (seeded): the digit classifier (~20 s) and toy_dit (~20 min on 2 cores).
toy-model: install
	$(PY) -m foca_bench.train_toy

tables: install
	$(PY) -m foca_bench.tables

# The paper's Table 3 rows on the real DiT-XL/2 architecture, FLOPs on the meta device (no weights needed).
flops-dit: install
	$(RUN) -m experiment=table3_dit
	$(PY) -m foca_bench.tables

flops-flux: install
	$(RUN) -m experiment=table1_flux
	$(PY) -m foca_bench.tables

# Per-step latency figures (full vs skipped step per method) and FoCa N=5's latency/FLOPs speed-up ratio.
bench: install
	$(PY) -m foca_bench.bench_latency

clean-results:
	rm -rf results/toy_fid results/flops results/cache results/traces results/tables results/figures results/hydra
