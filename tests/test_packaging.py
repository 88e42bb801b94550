"""Packaging: the repo-root directories ``kernels/`` and ``passes/`` are installed as
``flurka_rewrite.kernels`` and ``flurka_rewrite.passes`` only; the bare names must not import
from outside the repository (they would shadow, or be shadowed by, other projects' modules).

One subprocess (cwd = a temp dir, no PYTHONPATH, no GPU visible) tries every import and
reports the outcome of each as JSON: torch and the package are imported once for the file
(one test, so pytest-xdist does not run the probe once per worker)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import importlib, json, os
os.environ["CUDA_VISIBLE_DEVICES"] = ""
res = {}
for name in ["flurka_rewrite", "flurka_rewrite.passes", "flurka_rewrite.kernels", "passes",
             "kernels"]:
    try:
        importlib.import_module(name)
        res[name] = "ok"
    except ImportError as e:
        res[name] = "ImportError: " + str(e)
    except Exception as e:  # any other failure is reported as is
        res[name] = type(e).__name__ + ": " + str(e)
import torch
res["cuda"] = torch.cuda.is_available()
print(json.dumps(res))
"""


def test_package_layout_imports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("flurka_rewrite", "flurka_rewrite.passes", "flurka_rewrite.kernels"):
        assert res[name] == "ok", f"`import {name}` from {tmp_path} failed: {res[name]}"
    for name in ("passes", "kernels"):
        assert res[name].startswith("ImportError"), (
            f"`import {name}` from {tmp_path} gave {res[name]!r}; the bare name must not import")
    assert res["cuda"] is False, "the probe ran with no GPU visible"  # import works without CUDA


ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_package_is_marked_typed():
    """PEP 561: flurka_rewrite/py.typed exists and pyproject.toml ships it as package data."""
    import tomllib

    assert os.path.isfile(os.path.join(ROOT, "flurka_rewrite", "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["flurka_rewrite"]


def test_readme_says_how_to_install_torch_cpu_only_without_make():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### Without make"):]
    section = section[:section.index("\n#")]
    assert "CPU-only build" in section and "pip install -e '.[dev]'" in section
    assert "://" not in section  # no host names: the reader follows pytorch's install page
