# `make demo` and `make test` each do all of their own setup from a fresh clone, idempotently: the virtual
# environment is created once and reused; it is refreshed when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unif2ace demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider modeling_tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_text_path.py

clean:
	rm -rf $(VENV) demo_output
