# The only two commands a user needs: `make demo` and `make test`.
# Both create .venv on first use: torch 2.13.0 first (the CPU wheel, so pip never pulls a
# CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flurka-installed

.PHONY: demo test install clean

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

# TRITON_INTERPRET=1 runs the Triton kernels' tests on the CPU.
test: $(STAMP)
	cd tests && TRITON_INTERPRET=1 ../$(VENV)/bin/pytest -n 2 -q

clean:
	rm -rf $(VENV) out build *.egg-info
