# foca-bench. `make demo` and `make test` each work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := $(PY) run.py
# tables (Markdown, LaTeX and records.csv) and figures, both from the records' DataFrame (foca_bench.results)
REPORT := $(PY) -m foca_bench.tables && $(PY) -m foca_bench.figures

.PHONY: install env-imagereward env-vbench demo test test-slow toy-model tables readings flops-dit flops-flux \
	flops-hunyuan bench gpu-wheels gpu-check clean-results frontier

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# Plain PyPI torch: the CUDA build, which also runs on CPU-only machines.
	$(VENV)/bin/pip install --quiet torch torchvision
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

# A metric's own environment in $(1): an overlay venv whose own site-packages (the metric and its pins) come first,
# then .venv's, appended by a .pth file (torch, torchvision, numpy, PIL: not installed twice).
PURELIB := import sysconfig; print(sysconfig.get_paths()['purelib'])
define overlay_venv
$(PY) -m venv $(1)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c "$(PURELIB)"))')" \
		> $$($(1)/bin/python -c "$(PURELIB)")/_foca_main_venv.pth
endef

# ImageReward's own environment (benchmark=drawbench): image-reward pins timm==0.6.13 and needs transformers<4.40,
# which conflict with open-clip-torch and diffusers' FLUX pipeline in .venv.
IR_ENV := .envs/imagereward
env-imagereward: $(IR_ENV)/.installed

$(IR_ENV)/.installed: $(VENV)/.installed
	$(call overlay_venv,$(IR_ENV))
	$(IR_ENV)/bin/pip install --quiet "image-reward==1.5" "timm==0.6.13" "fairscale==0.4.13" \
		"transformers>=4.27.4,<4.40" "huggingface_hub<0.26" openai-clip "setuptools<70"
	$(IR_ENV)/bin/python -c "import ImageReward"
	touch $@

# VBench's own environment (benchmark=vbench): vbench 0.1.5 pins transformers==4.33.2, numpy<2 and timm<=1.0.12,
# which conflict with diffusers' pipelines and open-clip-torch in .venv; setuptools<70 gives openai-clip its
# `pkg_resources`. `make test` builds it (about a minute): the VBench tests run
# the real evaluator in it.
VB_ENV := .envs/vbench
env-vbench: $(VB_ENV)/.installed

$(VB_ENV)/.installed: $(VENV)/.installed
	$(call overlay_venv,$(VB_ENV))
	$(VB_ENV)/bin/pip install --quiet "vbench==0.1.5" "transformers==4.33.2" "numpy==1.26.4" "timm==1.0.12" \
		"setuptools<70"
	$(VB_ENV)/bin/python -c "import vbench, clip, decord, cv2"
	touch $@

# The default job: full compute, FoCa (its readings, and the BDF2-only ablation), TaylorSeer, FORA and
# reuse at N=3 and N=5 on the embedded toy_dit (conf/experiment/toy_dit.yaml: one job per conf/row/toy_dit/*.yaml,
# one process), then the Table-3-shaped table (Markdown + LaTeX) and the figures from the records.
demo: install
	$(RUN) -m experiment=toy_dit
	$(REPORT)

test: install env-vbench
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# Retrains the shipped checkpoints (seeded): the digit classifier (~20 s) and toy_dit (~20 min on 2 cores).
toy-model: install
	$(PY) -m foca_bench.train_toy

tables: install
	$(REPORT)

# Adaptive FoCa's quality-vs-FLOPs frontier beside fixed-N FoCa (three readings), TaylorSeer, TeaCache and MagCache on
# toy_dit, with bootstrap intervals and paired verdicts against DDIM-50: results/frontier/frontier.{md,json,png}.
frontier: install
	$(PY) -m foca_bench.frontier

# FoCa's readings (cache.reading=ours|cachedit|lab) beside FORA and TaylorSeer O=1/2 on toy_dit, open loop (replayed
# traces) and closed loop (generations) at N=3/5/7 and warmup 1/2: results/readings/readings.{md,json,png}, the
# evidence docs/methods.md picks FoCa's default reading from. Records already there are reused (force=true reruns).
readings: install
	$(PY) -m foca_bench.readings

# The paper's tables' rows on the real architectures, FLOPs only, on the meta device (no weights needed); the rows
# that decide from feature values (TeaCache, DBCache) need weights and are left out. The whole protocol (benchmark,
# latency) is `python run.py -m experiment=<table>` with weights and reference files: docs/sweeps.md.
flops-dit: install
	$(RUN) -m experiment=table3_dit profile=flops_only
	$(REPORT)

flops-flux: install
	$(RUN) -m experiment=table1_flux profile=flops_only '+row/table1_flux=glob(*,exclude=[teacache_*,dbcache_*])'
	$(REPORT)

flops-hunyuan: install
	$(RUN) -m experiment=table2_hunyuan profile=flops_only '+row/table2_hunyuan=glob(*,exclude=[teacache_*])'
	$(REPORT)

# Latency on the CPU, one table and one record (results/bench/): per model (toy_dit batch 16, DiT-XL/2 at batch 2
# with random weights, tiny FLUX), eager and compiled, full and skipped step per method, projected and measured
# latency/FLOPs ratios at N=5, diffusers' TaylorSeerCache beside ours. ~10 minutes on 2 idle cores.
bench: install
	$(PY) -m foca_bench.bench_latency

# The GPU check's missing packages (the lent GPU machine's python3.12 has torch but no diffusers, hydra-core,
# omegaconf or antlr4): pure-Python wheels into .gpu-wheels/ (ignored; ~7 MB), here, where there is network.
# antlr4-python3-runtime 4.9.3 exists only as a source archive: built into a wheel here.
GPU_WHEELS := .gpu-wheels
GPU_PINS := diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1
gpu-wheels: $(GPU_WHEELS)/.done

$(GPU_WHEELS)/.done:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
		--platform any -d $(GPU_WHEELS) $(GPU_PINS)
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	touch $@

# On one GPU (the lent machine: carry .gpu-wheels), < 8 minutes: FLUX.1-dev 1024x1024, DiT-XL/2 and HunyuanVideo
# with random weights, eager and compiled, latency/FLOPs ratios beside the paper's (results/gpu_check/). Uses the
# machine's python3, not .venv; fails in seconds without a GPU. GPU_CHECK_ARGS="--copy-to $$OUT" copies the table.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m foca_bench.gpu_check $(GPU_CHECK_ARGS)

clean-results:
	rm -rf results/toy_fid results/flops results/cache results/traces results/tables results/figures results/hydra \
		results/readings
