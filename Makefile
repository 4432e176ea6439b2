# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-all bench lint clean image image-test

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first: an unpinned torch pulls several GB of CUDA packages
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m bids_uad.cli.demo --output demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# the container image (docs/containers.md): official bases, or shared/tools/docker-engine.sh's
# stand-ins where they exist; image-test runs the tiny study inside it and compares with a venv run
IMAGE ?= bids_uad
E2E_WORKSPACE ?= /tmp/bids_uad_image_test

image:
	docker/build_image.sh $(IMAGE)

image-test:
	docker/test_image.sh $(IMAGE):latest $(E2E_WORKSPACE)

clean:
	rm -rf $(VENV) demo work build *.egg-info .pytest_cache
