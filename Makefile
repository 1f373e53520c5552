# Two entry points (see README.md): `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
# Keep CPU runs predictable on small machines.
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
