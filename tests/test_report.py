"""Report rendering: terminal table, JSON round trip, Markdown with Mermaid pictures."""
from __future__ import annotations

import json
from dataclasses import fields

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from flurka_rewrite.report import (
    COLUMNS, RewriteReport, SiteReport, digraph_from_fx, format_flops, format_flops_change,
    to_mermaid,
)

CAUSAL_NOTE = "dk not applied: low-rank projection is not causal"
T5_REASON = "learned additive position bias (T5 relative bias) on the scores; left as softmax"


def make_report() -> RewriteReport:
    """Three sites covering rewritten, rewritten-with-note, skipped, GQA and cross-attention."""
    return RewriteReport(model="ToyModel", config={"kernel": "performer", "dk": 64}, sites=[
        SiteReport(path="enc.layer.0.attn:softmax", pattern="matmul-div-softmax-matmul",
                   status="rewritten", kernel="performer", dk=64, num_features=80, seq_len=500,
                   kv_seq_len=500, heads=12, kv_heads=12, head_dim=64, causal=False,
                   mask="padding", hoisted=True, flops_before=3_000_000_000,
                   flops_after=600_000_000, params_added=64_000, rel_error=0.0123),
        SiteReport(path="dec.layer.0.attn:sdpa", pattern="sdpa", status="rewritten",
                   reason=CAUSAL_NOTE, kernel="relu", seq_len=63, heads=32, kv_heads=8,
                   head_dim=48, causal=True, mask="causal", hoisted=False,
                   flops_before=1_000_000, flops_after=250_000),
        SiteReport(path="t5.block.0.layer.0:softmax", pattern="matmul-add-softmax-matmul",
                   status="skipped", reason=T5_REASON, seq_len=63, kv_seq_len=77, heads=8,
                   flops_before=500_000),
    ])


def table_rows(text: str) -> list[str]:
    """The data rows of the terminal table (between the dashed rule and the notes; the
    end-to-end line and "what next" follow the notes)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    end = next((i for i, line in enumerate(lines)
                if line.startswith(("end-to-end:", "what next:"))), len(lines))
    return [line for line in lines[start:end] if line and not line.startswith("[")]


def test_terminal_table_has_one_row_per_site_and_all_columns() -> None:
    report = make_report()
    text = str(report)
    header = next(line for line in text.splitlines() if line.startswith("path"))
    for col in COLUMNS:
        assert col in header, f"column {col!r} missing from the header"
    rows = table_rows(text)
    assert len(rows) == len(report.sites)
    for row, site in zip(rows, report.sites):
        assert row.startswith(site.path) and site.status in row
    assert "3 attention sites found, 2 rewritten, 1 skipped" in text


def test_terminal_table_shows_reasons_and_measurements() -> None:
    text = str(make_report())
    flat = " ".join(text.split())  # reasons may wrap
    assert T5_REASON in flat and CAUSAL_NOTE in flat
    rows = table_rows(text)
    assert "[1]" in rows[1] and "[2]" in rows[2]  # notes numbered in site order
    assert "3G -> 600M (5.00x fewer)" in rows[0]
    assert "1.23e-02" in rows[0]
    assert "32/8kv" in rows[1]  # GQA heads
    assert "63x77" in rows[2]  # cross-attention: queries x keys


def test_total_flops_count_skipped_sites_unchanged() -> None:
    # before = 3e9 + 1e6 + 5e5; after = 6e8 + 2.5e5 + 5e5 (a skipped site keeps its cost)
    summary = make_report().summary()
    assert format_flops_change(3_001_500_000, 600_750_000) in summary


def test_empty_report_renders() -> None:
    report = RewriteReport(model="MLP")
    assert "no attention sites found" in str(report)
    assert "No attention sites were found." in report.to_markdown()


@pytest.mark.parametrize("n,text", [(999, "999"), (1_500, "1.5K"), (2_340_000, "2.34M"),
                                    (7e9, "7G"), (1.25e12, "1.25T")], ids=str)
def test_format_flops(n: float, text: str) -> None:
    assert format_flops(n) == text


def test_json_round_trip_via_from_dict() -> None:
    report = make_report()
    report.graphs["enc.layer.0.attn:softmax"] = (nx.DiGraph(), nx.DiGraph())
    data = json.loads(report.to_json())
    contract = [f.name for f in fields(SiteReport)]
    for site in data["sites"]:
        assert list(site) == contract  # exactly the contract fields, graphs not serialized
    assert set(data) == {"model", "config", "sites", "end_to_end_error", "max_seq_len"}
    back = RewriteReport.from_dict(data)
    assert back == report  # graphs do not take part in equality
    assert back.sites[0].rel_error == 0.0123  # floats survive JSON exactly
    assert back.to_dict() == report.to_dict()


def attention(q, k, v):  # the spelling the compiler sees most often
    return F.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1) @ v


def test_markdown_has_table_and_mermaid_blocks_when_graphs_attached() -> None:
    report = make_report()
    before = digraph_from_fx(fx.symbolic_trace(attention).graph.nodes,
                             kinds={"softmax": "site"})
    after = nx.DiGraph()
    after.add_node("q", kind="input")
    after.add_node("flurka", label="FlurkaAttention(performer, dk=64)", kind="flurka")
    after.add_node("out", kind="output")
    after.add_edges_from([("q", "flurka"), ("flurka", "out")])
    report.graphs["enc.layer.0.attn:softmax"] = (before, after)
    report.graphs["t5.block.0.layer.0:softmax"] = (before, None)
    md = report.to_markdown()
    assert md.count("```mermaid") == 3  # before+after for the rewrite, before for the skip
    assert md.count("\n| `") == 3  # one table row per site
    assert "FlurkaAttention(performer, dk=64)" in md and "class n1 flurka" in md
    assert "Left as it is." in md
    assert T5_REASON in md
    # The unpictured site has no section, and the picture has the FX nodes in order.
    assert "### `dec.layer.0.attn:sdpa`" not in md
    block = md.split("```mermaid\n")[1].split("```")[0]
    assert block.startswith("flowchart TD")
    assert '["softmax"]' in block and "class n6 site" in block


def test_markdown_without_graphs_has_no_mermaid() -> None:
    md = make_report().to_markdown()
    assert "```mermaid" not in md and "| path |" in md


def test_mermaid_escapes_labels_and_caps_size() -> None:
    g = nx.DiGraph()
    g.add_node("a", label='x["<y>"] #1')
    text = to_mermaid(g)
    assert 'n0["x[#quot;#lt;y#gt;#quot;] #35;1"]' in text
    chain = nx.path_graph(100, create_using=nx.DiGraph)
    text = to_mermaid(chain, max_nodes=10)
    assert "n9" in text and "n10" not in text and "90 more nodes" in text


def test_mermaid_of_exported_graph_uses_short_aten_names() -> None:
    qkv = tuple(torch.randn(2, 5, 8) for _ in range(3))
    ep = torch.export.export(fx.symbolic_trace(attention), qkv)
    text = to_mermaid(digraph_from_fx(ep.graph.nodes))
    assert '["softmax"]' in text and "aten" not in text and ".default" not in text


# -- what next, end-to-end error, max_seq_len (issue 17) -------------------------------------
def guided_report() -> RewriteReport:
    report = make_report()
    report.sites[0].rel_error, report.sites[0].params_added = 0.85, 64_000
    report.end_to_end_error, report.max_seq_len = 0.2633, 512
    return report


def test_new_report_fields_round_trip_through_json() -> None:
    report = guided_report()
    data = json.loads(report.to_json())
    assert data["end_to_end_error"] == 0.2633 and data["max_seq_len"] == 512
    assert RewriteReport.from_dict(data) == report
    old = {"model": "M", "config": {}, "sites": []}  # a report written before these fields
    assert RewriteReport.from_dict(old).end_to_end_error is None


def test_terminal_report_ends_with_what_next() -> None:
    text = str(guided_report())
    head, tail = text.split("\nwhat next:\n")
    assert "end-to-end: relative error of the model output on the example inputs = 2.633e-01" \
        in head
    tail = " ".join(tail.split())
    assert "1 of 2 rewritten sites have rel_error > 0.1 (largest 8.50e-01 at " \
           "enc.layer.0.attn:softmax)" in tail
    assert f"skipped 1 site (t5.block.0.layer.0:softmax): {T5_REASON}" in tail
    assert "max_seq_len = 512" in tail and "--max-seq-len" in tail
    assert "fr.distill(new_model, teacher=model, data=batches, steps=500)" in tail
    assert "what next" not in str(RewriteReport(model="M"))  # nothing to advise


def test_markdown_report_ends_with_what_next() -> None:
    md = guided_report().to_markdown()
    last = md.rstrip().rsplit("\n## ", 1)[-1]
    assert last.startswith("What next") and "`fr.distill(" in last and "`--skip GLOB`" in last
    assert "2.633e-01" in md and "(max_seq_len): 512" in md


def test_what_next_of_a_plan_and_of_exact_mode() -> None:
    plan = make_report()  # nothing built: params_added is None everywhere
    plan.sites[0].params_added = None
    assert "a dry run (plan)" in str(plan)
    exact = RewriteReport(model="M", sites=[SiteReport(
        path="a:sdpa", pattern="sdpa", status="rewritten", kernel="softmax", params_added=0,
        rel_error=0.0)])
    assert "exact softmax attention (nothing to up-train" in " ".join(str(exact).split())
