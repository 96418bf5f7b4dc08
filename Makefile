# foca-bench. `make demo` and `make test` each work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := $(PY) run.py
# tables (Markdown, LaTeX and records.csv) and figures, both from the records' DataFrame (foca_bench.results)
REPORT := $(PY) -m foca_bench.tables && $(PY) -m foca_bench.figures

.PHONY: install env-imagereward env-vbench demo test test-slow toy-model tables flops-dit flops-flux flops-hunyuan bench clean-results

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

# The default job: full compute, FoCa (both slope readings and the BDF2-only ablation), TaylorSeer, FORA and
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

# The paper's Table 3 rows on the real DiT-XL/2 architecture, FLOPs on the meta device (no weights needed).
flops-dit: install
	$(RUN) -m experiment=table3_dit
	$(REPORT)

flops-flux: install
	$(RUN) -m experiment=table1_flux
	$(REPORT)

flops-hunyuan: install
	$(RUN) -m experiment=table2_hunyuan
	$(REPORT)

# Per-step latency figures (full vs skipped step per method) and FoCa N=5's latency/FLOPs speed-up ratio.
bench: install
	$(PY) -m foca_bench.bench_latency

clean-results:
	rm -rf results/toy_fid results/flops results/cache results/traces results/tables results/figures results/hydra
