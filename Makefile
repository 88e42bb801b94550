# The commands a user needs: `make demo` and `make test` (plus `make test-fast`, `make test-gpu`
# and `make lint` for development). All create .venv on first use: torch 2.13.0 first (the CPU wheel, so pip never pulls a
# CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flurka-installed

.PHONY: demo test test-fast test-gpu lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded demo transformer (flurka_rewrite/demo.py, no download) through the real CLI,
# then the converted program is loaded and run on new inputs beside the original.
demo: $(STAMP)
	$(VENV)/bin/flurka-rewrite --demo -o out/demo_flurka.pt2 --kernel performer --dk 64 \
		--example-shape 2,256 --report out/demo_report.md --force
	$(PY) -m flurka_rewrite.demo --check out/demo_flurka.pt2

# The whole suite. TRITON_INTERPRET=1 runs the Triton kernels' tests on the CPU; the 15 slowest
# tests are listed at the end.
test: $(STAMP)
	cd tests && TRITON_INTERPRET=1 ../$(VENV)/bin/pytest -n 2 -q --durations=15

# The quick lane: the same, less the tests marked `slow` (tests/conftest.py marks whole files:
# the Hugging Face zoos, Triton, ONNX, CLI, benchmarks, real-world-model and example tests).
test-fast: $(STAMP)
	cd tests && TRITON_INTERPRET=1 ../$(VENV)/bin/pytest -n 2 -q -m "not slow"

# The Triton kernels compiled for a CUDA GPU, without the interpreter. Needs a CUDA build of
# torch (the venv's default is the CPU wheel) and a visible GPU, else it stops with a message:
# without CUDA, tests/test_triton.py would fall back to TRITON_INTERPRET=1 and test nothing new.
test-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make test-gpu: ' \
		'no CUDA device visible to torch ' + torch.__version__ + ' (a CPU build, or no GPU); ' \
		'the CPU lane is make test')"
	cd tests && env -u TRITON_INTERPRET ../$(VENV)/bin/pytest -q test_triton.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info
