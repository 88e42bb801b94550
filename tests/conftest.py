"""Suite-wide settings. CI runs `pytest -n 2` on a 2-core machine: one intra-op thread per
worker keeps the two workers from fighting over the cores (measured: the HF zoo's 28 forward
passes take 0.2 s with 1 thread per worker and 7 s with 2)."""
import fnmatch
import os
import sys

import pytest
import torch

torch.set_num_threads(1)
# Let test modules import their helpers (zoo_hf, models_handwritten) by plain name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# `make test-fast` runs `-m "not slow"`. Whole files are marked here, by name. Chosen from one
# `pytest -n 2 --durations=0` run of the suite (2-core CPU, TRITON_INTERPRET=1; seconds of
# test time per file): the HF zoos (112 + 36), Triton under the interpreter (50), ONNX (34),
# the CLI's real-process round trips (29), benchmarks (27), the examples (19 + 5 + 4) and the
# real-world models (5). Every other file took under 9 s (most under 2 s), so it stays in the
# fast lane: that leaves ~45 s of the ~365 s.
SLOW_FILES = (
    "test_hf_zoo.py", "test_hf_zoo_more.py", "test_match_realworld.py", "test_onnx.py",
    "test_example_*.py", "test_triton.py", "test_triton_fused.py", "test_cli.py",
    "test_cli_guide.py",
    "test_benchmarks.py",
    "test_onnx_step.py",  # four ONNX exports of a decoding step: ~60 s
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(fnmatch.fnmatch(item.path.name, pat) for pat in SLOW_FILES):
            item.add_marker(pytest.mark.slow)
