"""Packaging: the repo-root directories ``kernels/`` and ``passes/`` are installed as
``flurka_rewrite.kernels`` and ``flurka_rewrite.passes`` only; the bare names must not import
from outside the repository (they would shadow, or be shadowed by, other projects' modules).

One subprocess (cwd = a temp dir, no PYTHONPATH, no GPU visible) tries every import and
reports the outcome of each as JSON, so torch is imported once for the whole file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import importlib, json, os, sys
os.environ["CUDA_VISIBLE_DEVICES"] = ""
res = {}
for name in ["flurka_rewrite", "flurka_rewrite.passes", "flurka_rewrite.kernels", "passes", "kernels"]:
    try:
        importlib.import_module(name)
        res[name] = "ok"
    except ImportError as e:
        res[name] = "ImportError: " + str(e)
    except Exception as e:  # any other failure is reported as is
        res[name] = type(e).__name__ + ": " + str(e)
from flurka_rewrite.kernels import flurka_attention, build_feature_map  # noqa: F401
from flurka_rewrite import FlurkaAttention  # noqa: F401
import torch
res["cuda"] = torch.cuda.is_available()
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["flurka_rewrite", "flurka_rewrite.passes", "flurka_rewrite.kernels"])
def test_package_names_import_from_anywhere(probe, name):
    assert probe[name] == "ok", probe[name]


@pytest.mark.parametrize("name", ["passes", "kernels"])
def test_bare_top_level_names_do_not_import(probe, name):
    assert probe[name].startswith("ImportError"), f"`import {name}` gave {probe[name]!r}"


def test_import_without_cuda(probe):
    """Everything above ran with no GPU visible."""
    assert probe["cuda"] is False
