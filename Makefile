# fl-imaging: `make demo` and `make test` work on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fl-imaging-installed
DEMO_DATA := data/synthetic/hospital_a/dataset.json
# Keep Flower's state (SuperLink database, installed app bundles) inside the project.
export FLWR_HOME ?= $(CURDIR)/.flwr

.PHONY: demo test test-docker lint setup data hippocampus tumour synthetic-start clean-outputs

## demo: set up if needed, make the synthetic hospitals if missing, run the federated demo
demo: $(STAMP) $(DEMO_DATA)
	$(BIN)/fl-imaging run experiment=demo

## test: set up if needed, lint, then the whole test suite
test: $(STAMP)
	$(BIN)/ruff check fl_imaging tests scripts
	$(BIN)/pytest

## test-docker: build ./Dockerfile, bring up compose.yaml (SuperLink + 3 hospitals), 2 rounds, coordinator restart + resume, down (root; docs/DEPLOYMENT.md)
test-docker: $(STAMP)
	scripts/docker/test_docker.sh

## setup: create the virtualenv and install the project with its dev tools
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

## data: the embedded default data (3 synthetic hospitals, deterministic)
data: $(DEMO_DATA)

$(DEMO_DATA): | $(STAMP)
	$(BIN)/fl-imaging synth --out data/synthetic

## tumour: BraTS-like synthetic hospitals (T1c + FLAIR files, BraTS 2021 labels, WT/TC/ET)
TUMOUR_DATA := data/tumour_synthetic/hospital_a/dataset.json
tumour: $(STAMP) $(TUMOUR_DATA)
	$(BIN)/fl-imaging run experiment=tumour_synthetic

$(TUMOUR_DATA): | $(STAMP)
	$(BIN)/fl-imaging synth --out data/tumour_synthetic --modalities T1c FLAIR --layout files \
		--label-scheme brats2021 --fov-mm 96

## hippocampus: the real-data experiment on ../shared/data/msd_hippocampus
hippocampus: $(STAMP)
	$(BIN)/fl-imaging run experiment=hippocampus

## synthetic-start: a model trained on 208 synthetic cases (no patient, no privacy cost) to start private runs from (model.init_checkpoint=data/synthetic_start/unet_dp.pt)
SYNTHETIC_START := data/synthetic_start/unet_dp.pt
synthetic-start: $(SYNTHETIC_START)

$(SYNTHETIC_START): | $(STAMP)
	$(BIN)/fl-imaging synth --out data/synthetic_start --cases 208 --seed 1 --overwrite
	$(BIN)/fl-imaging run experiment=synthetic_start paths.outputs=data/synthetic_start/outputs
	cp data/synthetic_start/outputs/latest/checkpoints/best.pt $@

lint: $(STAMP)
	$(BIN)/ruff check fl_imaging tests scripts
	$(BIN)/ruff format --check fl_imaging tests scripts

clean-outputs:
	rm -rf outputs
