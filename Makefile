# Two entry points (see README.md): `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
# Keep CPU runs predictable on small machines. (Unless set by the caller, the CPU study leaves it unset: its
# tools/run_study.py then gives each of `--parallel N` runs cores // N threads.)
ifeq ($(origin OMP_NUM_THREADS),undefined)
STUDY_CPU_ENV := env -u OMP_NUM_THREADS
endif
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test camvid clean-venv

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py --output output/demo

test: setup
	$(PY) -m pytest -q tests

# Copies the full CamVid train/val folders (../shared/datasets/camvid) under $DETECTRON2_DATASETS/camvid.
camvid: setup
	$(PY) tools/prepare_camvid.py --src ../shared/datasets/camvid --dst $(DETECTRON2_DATASETS)/camvid

clean-venv:
	rm -rf .venv

# ---- CamVid 1/8 study (docs/results/camvid.md): tools/run_study.py; extra flags via STUDY_ARGS="--seeds 0 ..."
.PHONY: study study-report study-wheels
STUDY_ARGS ?=
STUDY_WHEEL_PKGS := fvcore iopath yacs omegaconf antlr4-python3-runtime pycocotools termcolor

# Every method x seeds 0 1 on the GPU (finished runs are skipped), then docs/results/camvid.md + PNGs.
study: setup camvid
	$(PY) tools/run_study.py $(STUDY_ARGS)

# Only the report, from run folders (e.g. STUDY_ARGS="--runs-root parts/1 parts/2" for unpacked --pack archives).
study-report: setup
	$(PY) tools/run_study.py --report $(STUDY_ARGS)

# .whl/: what the device machine (Python 3.12 with torch, no detectron2, no network) lacks, at this venv's versions;
# carried to it with the dataset (docs/results/camvid.md "How to run").
study-wheels: setup
	mkdir -p .whl
	cp .cache/wheels/sal_detectron2-0.7.2-py3-none-any.whl .whl/
	pins=$$($(PY) -c "import importlib.metadata as m; print(' '.join(p + '==' + m.version(p) for p in '$(STUDY_WHEEL_PKGS)'.split()))"); \
	for pin in $$pins; do \
	  $(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl $$pin 2>/dev/null \
	  || $(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w .whl $$pin || exit 1; \
	done
	ls .whl

# ---- CamVid CPU study (docs/results/camvid_cpu.md): configs/camvid/protocol_cpu.yaml on top of every study config,
# 8 methods x seeds 0 1 2 (2400 iterations: the file's STUDY.SCHEDULE_SCALE 2); finished runs (docs/results/camvid_cpu/<method>/seed<k>/) are skipped, so it continues.
.PHONY: study-cpu
study-cpu: setup camvid
	$(STUDY_CPU_ENV) nice -n 10 $(PY) tools/run_study.py --protocol cpu $(STUDY_ARGS)
