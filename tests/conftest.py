"""Suite-wide settings. CI runs `pytest -n 2` on a 2-core machine: one intra-op thread per
worker keeps the two workers from fighting over the cores (measured: the HF zoo's 28 forward
passes take 0.2 s with 1 thread per worker and 7 s with 2)."""
import os
import sys

import torch

torch.set_num_threads(1)
# Let test modules import their helpers (zoo_hf, models_handwritten) by plain name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
