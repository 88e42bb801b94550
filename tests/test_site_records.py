"""The site's records each have one writer (passes/site.py; issue 14).

Read from the source: every construction of a record, every assignment of a record to a site
and every assignment to a record's field (``x.shapes.heads = ...``) must be in the record's
owning pass. At run time, assigning a record's field on the site itself raises.
"""
from __future__ import annotations

import ast
import os

import pytest

from flurka_rewrite.passes.site import Decision, Found, Outcome, Shapes, Site

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNERS = {  # record attribute on Site -> (class, files allowed to write it)
    "found": (Found, {"passes/match.py", "passes/unmatched.py", "passes/mha.py"}),
    "shapes": (Shapes, {"passes/legality.py"}),
    "decision": (Decision, {"passes/decide.py"}),
    "outcome": (Outcome, {"passes/apply.py"}),
}
COPIER = "passes/verify.py"  # remap_site copies records into a copied graph's nodes


def _sources() -> dict[str, ast.Module]:
    out = {}
    for folder in ("passes", "kernels", "flurka_rewrite"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                rel = f"{folder}/{name}"
                with open(os.path.join(ROOT, rel)) as f:
                    out[rel] = ast.parse(f.read(), rel)
    return out


def _writes(tree: ast.Module) -> list[tuple[str, int]]:
    """(record, line) for each write of a record found in ``tree``."""
    classes = {cls.__name__: rec for rec, (cls, _) in OWNERS.items()}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in classes:
            found.append((classes[node.func.id], node.lineno))
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for x in ast.walk(t):
                if isinstance(x, ast.Attribute) and x.attr in OWNERS and not (
                        isinstance(x.value, ast.Name) and x.value.id == "self"):  # s.shapes =
                    found.append((x.attr, node.lineno))
                if isinstance(x, ast.Attribute) and isinstance(x.value, ast.Attribute) \
                        and x.value.attr in OWNERS:  # site.shapes.heads = ...
                    found.append((x.value.attr, node.lineno))
    return found


def test_each_record_is_written_by_its_pass_only() -> None:
    bad = []
    seen = {rec: set() for rec in OWNERS}
    for rel, tree in _sources().items():
        for rec, line in _writes(tree):
            seen[rec].add(rel)
            if rel not in OWNERS[rec][1] and rel != COPIER:
                bad.append(f"{rel}:{line} writes the site's {rec} record "
                           f"(owned by {sorted(OWNERS[rec][1])})")
    assert not bad, "\n".join(bad)
    for rec, (_, files) in OWNERS.items():  # the check sees the owners' writes
        assert seen[rec] & files, f"no write of {rec} found in {sorted(files)}"


@pytest.mark.parametrize("name", ["kernel", "heads", "q", "verified", "mask_kind", "hoisted"])
def test_site_refuses_assignment_of_a_record_field(name: str) -> None:
    site = Site(Found(module_path="m", node_name="sdpa", pattern="sdpa"))
    with pytest.raises(AttributeError, match="record"):
        setattr(site, name, 1)


def test_reads_come_from_the_newest_record() -> None:
    """Outcome over decision over shapes over found; None in the outcome for m and hoisting
    means 'not built': the decision's value shows."""
    site = Site(Found(module_path="m", node_name="sdpa", pattern="sdpa", scale=None,
                      causal=False))
    assert site.mask_kind == "none" and site.layout == "bhnd" and site.heads is None
    site.shapes = Shapes(scale=0.125, causal=True, heads=4)
    assert (site.scale, site.causal, site.heads) == (0.125, True, 4)
    site.decision = Decision(kernel="performer", num_features=64, hoisted=True)
    site.outcome = Outcome(verified=False)
    assert (site.num_features, site.hoisted, site.verified) == (64, True, False)
    site.outcome = Outcome(num_features=32, hoisted=False)
    assert (site.num_features, site.hoisted) == (32, False)
    with pytest.raises(AttributeError):
        _ = site.no_such_field
