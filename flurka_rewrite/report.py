"""The rewrite report (docs/design.md §5): one ``SiteReport`` per attention site found.

``RewriteReport`` prints as a terminal table (``str(report)``), serializes to a dict / JSON with
exactly the contract fields (``to_dict``, ``to_json``, ``from_dict``), and renders Markdown
(``to_markdown``) with a summary, the table, and per site a Mermaid picture of the site before
and after rewriting.

Picture hook: the compiler sets ``report.graphs[site.path] = (before, after)``, two
``networkx.DiGraph`` of the site's region. Node attributes (all optional): ``label`` (text
shown; default "name: target" from the ``op``/``target`` attributes that
``passes.graph_nx.to_digraph`` sets, else ``str(node)``) and ``kind`` (``"input"``,
``"output"``, ``"site"`` = a node of the original attention, ``"flurka"`` = a node the rewrite
added, anything else = plain). Edge attribute ``label`` (optional). ``digraph_from_fx``
(passes/graph_nx.py) builds such a graph from FX nodes. The graphs are not serialized:
``to_dict``/``to_json`` hold the contract fields only.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from flurka_rewrite.passes.graph_nx import digraph_from_fx  # noqa: F401 - re-exported
from flurka_rewrite.report_next import md_code, end_to_end_line, what_next

# Mermaid pictures of bigger regions are cut to this many nodes (a note says so).
MAX_MERMAID_NODES = 80


@dataclass
class SiteReport:
    """What happened at one attention site. Every field is present; None where not applicable."""

    path: str  # module path and node, e.g. "encoder.layer.3.attention.self:softmax"
    pattern: str  # which spelling matched, e.g. "matmul-div-softmax-matmul", "sdpa", "mha"
    status: str  # "rewritten" | "skipped"
    reason: str | None = None  # why skipped, or notes on a rewrite (e.g. dk not applied: causal)
    kernel: str | None = None
    dk: int | None = None
    num_features: int | None = None
    seq_len: int | None = None
    kv_seq_len: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool | None = None
    mask: str | None = None  # "none" | "padding" | "causal" | "causal+padding" | "bias" | "other"
    hoisted: bool | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    params_added: int | None = None
    rel_error: float | None = None  # measured on the example inputs, when given
    # True: the rewrite's exact twin reproduced the original unit on the example inputs (and
    # on the padded probe); False: it did not, and the unit was rolled back (see reason);
    # None: not run (planned without example inputs, or the site was skipped before).
    verified: bool | None = None
    window: int | None = None  # sliding-window size of exact softmax beside the kernel part


@dataclass
class RewriteReport:
    """All sites of one conversion, in graph order."""

    sites: list[SiteReport] = field(default_factory=list)
    model: str | None = None  # class name of the converted model
    config: dict[str, Any] = field(default_factory=dict)  # the options used (JSON-able)
    # ||y' - y|| / ||y|| of the whole model's first output on the example inputs, measured by
    # convert (None: plan, no example inputs, or nothing rewritten)
    end_to_end_error: float | None = None
    # the longest key sequence the rewritten low-rank sites accept (the smallest of theirs;
    # None: no rewritten site has a dk, the rewrite sets no limit)
    max_seq_len: int | None = None
    # site path -> (before, after) networkx.DiGraph for the Markdown pictures; not serialized.
    graphs: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return {"model": self.model, "config": self.config,
                "sites": [asdict(s) for s in self.sites],
                "end_to_end_error": self.end_to_end_error, "max_seq_len": self.max_seq_len}

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RewriteReport":
        """Inverse of ``to_dict``."""
        names = {f.name for f in fields(SiteReport)}
        sites = [SiteReport(**{k: v for k, v in s.items() if k in names}) for s in d["sites"]]
        return cls(sites=sites, model=d.get("model"), config=d.get("config", {}),
                   end_to_end_error=d.get("end_to_end_error"), max_seq_len=d.get("max_seq_len"))

    # -- rendering -----------------------------------------------------------------------
    def summary(self) -> str:
        """One line: model, site counts and total attention FLOPs before -> after."""
        n, r = len(self.sites), len(self.rewritten)
        line = (f"{self.model or 'model'}: {n} attention site{'s' if n != 1 else ''} found, "
                f"{r} rewritten, {n - r} skipped")
        before, after = _total_flops(self.sites)
        if before:
            line += f"; attention FLOPs {format_flops_change(before, after)}"
        return line

    def __str__(self) -> str:
        """Terminal table, one row per site; reasons are listed as numbered notes below it."""
        rows, notes = [], []
        for s in self.sites:
            row = _site_cells(s)
            if s.reason:
                notes.append(s.reason)
                row[-1] = f"[{len(notes)}]"
            rows.append(row)
        lines = [f"flurka-rewrite report: {self.summary()}"]
        if self.config:
            lines.append("options: " + " ".join(f"{k}={v}" for k, v in self.config.items()
                                                if v is not None))
        lines.append(_text_table(COLUMNS, rows) if rows else "(no attention sites found)")
        for i, note in enumerate(notes, 1):
            lines.extend(textwrap.wrap(note, width=100, initial_indent=f"[{i}] ",
                                       subsequent_indent=" " * (len(str(i)) + 3)))
        if self.end_to_end_error is not None:
            lines.append(end_to_end_line(self.end_to_end_error))
        steps = what_next(self)
        if steps:
            lines.append("what next:")
            for step in steps:
                lines.extend(textwrap.wrap(step, width=100, initial_indent="  - ",
                                           subsequent_indent="    "))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Markdown: summary, options, the site table, and per site its before/after picture
        (Mermaid flowcharts) when the compiler attached graphs."""
        out = ["# flurka-rewrite report", "", f"**{self.summary()}**", ""]
        if self.config:
            out.append("Options: " + ", ".join(f"`{k}={v}`" for k, v in self.config.items()
                                               if v is not None))
            out.append("")
        if self.end_to_end_error is not None:
            out += [end_to_end_line(self.end_to_end_error), ""]
        if self.max_seq_len is not None:
            out += [f"Longest key sequence the low-rank sites accept (max_seq_len): "
                    f"{self.max_seq_len}", ""]
        if not self.sites:
            out.append("No attention sites were found.")
            return "\n".join(out) + "\n"
        out.append(_md_table(COLUMNS, [_site_cells(s) for s in self.sites]))
        pictured = [s for s in self.sites if s.path in self.graphs]
        if pictured:
            out += ["", "## Sites, before and after"]
        for s in pictured:
            before, after = self.graphs[s.path]
            out += ["", f"### `{s.path}` ({s.status})", ""]
            if s.reason:
                out += [f"{s.reason}", ""]
            out += ["Before:", "", "```mermaid", to_mermaid(before), "```", ""]
            if s.status == "rewritten" and after is not None:
                out += ["After:", "", "```mermaid", to_mermaid(after), "```"]
            else:
                out.append("Left as it is.")
        steps = what_next(self)
        if steps:
            out += ["", "## What next", ""] + [f"- {md_code(step)}" for step in steps]
        return "\n".join(out) + "\n"


# -- cells -------------------------------------------------------------------------------
COLUMNS = ("path", "pattern", "status", "kernel", "dk", "m", "N", "heads", "causal", "mask",
           "hoisted", "FLOPs before->after (ratio)", "rel_error", "verified", "reason")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_flops(n: int | float) -> str:
    """1234567 -> '1.23M' (SI prefixes K, M, G, T, P)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def format_flops_change(before: int | None, after: int | None) -> str:
    """'1.2G -> 300M (4.00x fewer)'; '-' when unknown."""
    if before is None:
        return "-"
    if after is None:
        return format_flops(before)
    text = f"{format_flops(before)} -> {format_flops(after)}"
    if after > 0:
        ratio = before / after
        if abs(ratio - 1) < 0.005:
            text += " (same)"
        else:
            text += f" ({ratio:.2f}x fewer)" if ratio > 1 else f" ({1 / ratio:.2f}x more)"
    return text


def _site_cells(s: SiteReport) -> list[str]:
    n = _cell(s.seq_len)
    if s.kv_seq_len is not None and s.kv_seq_len != s.seq_len:
        n = f"{n}x{s.kv_seq_len}"  # queries x keys (cross-attention)
    heads = _cell(s.heads)
    if s.kv_heads is not None and s.kv_heads != s.heads:
        heads = f"{heads}/{s.kv_heads}kv"  # GQA
    err = "-" if s.rel_error is None else f"{s.rel_error:.2e}"
    kernel = _cell(s.kernel) + ("" if s.window is None else f" w={s.window}")  # + window
    return [s.path, s.pattern, s.status, kernel, _cell(s.dk), _cell(s.num_features), n,
            heads, _cell(s.causal), _cell(s.mask), _cell(s.hoisted),
            format_flops_change(s.flops_before, s.flops_after), err, _cell(s.verified),
            _cell(s.reason)]


def _total_flops(sites: Iterable[SiteReport]) -> tuple[int, int]:
    """Sum of FLOPs before and after over sites that report both (skipped sites: after =
    before)."""
    before = after = 0
    for s in sites:
        if s.flops_before is None:
            continue
        before += s.flops_before
        after += s.flops_after if s.flops_after is not None else s.flops_before
    return before, after


def _text_table(header: Iterable[str], rows: list[list[str]]) -> str:
    header = list(header)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Iterable[str], rows: list[list[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"`{_md_escape(r[0])}`"] + [_md_escape(c) for c in r[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- Mermaid -----------------------------------------------------------------------------
_SHAPES = {"input": ('(["', '"])'), "output": ('(["', '"])'), "flurka": ('{{"', '"}}')}
_CLASSES = {
    "site": "fill:#fdebd0,stroke:#b9770e",
    "flurka": "fill:#d5f5e3,stroke:#1e8449,stroke-width:2px",
    "input": "fill:#eaf2f8,stroke:#2e86c1",
    "output": "fill:#eaf2f8,stroke:#2e86c1",
}


def _mermaid_text(text: str) -> str:
    """Escape a label for a quoted Mermaid node label."""
    return (text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;")
            .replace(">", "#gt;").replace("\n", " "))


def _short_target(target: str) -> str:
    """'<built-in function matmul>' -> 'matmul'; '<function softmax at 0x..>' -> 'softmax';
    'aten.softmax.int' -> 'aten.softmax'."""
    if target.startswith("<"):
        words = target.strip("<>").split()
        target = words[2] if words[:2] == ["built-in", "function"] and len(words) > 2 else (
            words[1] if len(words) > 1 else target)
    if target.startswith("aten.") and target.count(".") == 2:
        target = target.rsplit(".", 1)[0]
    return target


def _node_label(node: Any, attrs: dict[str, Any]) -> str:
    """The ``label`` attribute, else 'name: target' from the ``op``/``target`` attributes that
    ``passes.graph_nx.to_digraph`` sets, else the node itself."""
    if attrs.get("label") is not None:
        return str(attrs["label"])
    if attrs.get("target") is not None and attrs.get("op") not in ("placeholder", "output",
                                                                     "get_attr"):
        target = _short_target(str(attrs["target"]))
        if str(node).rstrip("0123456789").rstrip("_") == target.split(".")[-1]:
            return str(node)  # "matmul_1: matmul" says nothing more than "matmul_1"
        return f"{node}: {target}"
    return str(node)


def to_mermaid(graph: Any, *, direction: str = "TD",
               max_nodes: int = MAX_MERMAID_NODES) -> str:
    """A ``networkx.DiGraph`` as a Mermaid flowchart (node ids renamed n0, n1, ... in
    topological order when acyclic). Node attrs: ``label``, ``kind``; edge attr ``label``."""
    import networkx as nx

    try:
        order = list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:  # cyclic: keep insertion order
        order = list(graph.nodes)
    shown = order[:max_nodes]
    ids = {node: f"n{i}" for i, node in enumerate(shown)}
    lines = [f"flowchart {direction}"]
    used: dict[str, list[str]] = {}
    for node in shown:
        attrs = graph.nodes[node]
        kind = attrs.get("kind") or {"placeholder": "input", "output": "output"}.get(
            attrs.get("op"))
        left, right = _SHAPES.get(kind, ('["', '"]'))
        lines.append(f"    {ids[node]}{left}{_mermaid_text(_node_label(node, attrs))}{right}")
        if kind in _CLASSES:
            used.setdefault(kind, []).append(ids[node])
    for u, v, attrs in graph.edges(data=True):
        if u in ids and v in ids:
            label = attrs.get("label")
            arrow = f' -->|"{_mermaid_text(str(label))}"| ' if label else " --> "
            lines.append(f"    {ids[u]}{arrow}{ids[v]}")
    if len(order) > len(shown):
        lines.append(f'    more["... {len(order) - len(shown)} more nodes not shown"]')
    for kind, members in used.items():
        lines.append(f"    classDef {kind} {_CLASSES[kind]}")
        lines.append(f"    class {','.join(members)} {kind}")
    return "\n".join(lines)


def report_of(sites: list, model_name: str, cfg: Any) -> "RewriteReport":
    """The report of a conversion: one row per ``passes.site.Site`` in model order, the
    options (``RewriteConfig``) and the before/after pictures of the rewritten sites."""
    report = RewriteReport(sites=[_row(s) for s in sorted(sites, key=lambda s: s.index)],
                           model=model_name, config=_config_dict(cfg))
    limits = [getattr(s, "max_seq_len", None) for s in sites if s.ok and s.dk is not None]
    limits = [n for n in limits if isinstance(n, int)]
    report.max_seq_len = min(limits) if limits else None
    for s in sites:
        if s.ok and s.graphs and all(x is not None for x in s.graphs):
            report.graphs[s.path] = s.graphs
    return report


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    d["filter_fn"] = None if cfg.filter_fn is None else getattr(cfg.filter_fn, "__name__", "fn")
    return d


def _row(site: Any) -> SiteReport:
    r = SiteReport(
        path=site.path, pattern=site.pattern, status="rewritten" if site.ok else "skipped",
        reason=site.reason, seq_len=site.seq_len, kv_seq_len=site.kv_seq_len,
        heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
        causal=site.causal if site.seq_len is not None else None,
        mask=site.mask_kind if site.seq_len is not None else None)
    if site.ok:
        r.kernel, r.dk, r.num_features = site.kernel, site.dk, site.num_features
        r.hoisted = site.hoisted
        r.flops_before, r.flops_after = site.flops_before, site.flops_after
        r.params_added, r.rel_error = site.params_added, site.rel_error
        r.window = site.window
        r.reason = "; ".join(site.notes_for_report) or None
    else:
        r.flops_before = site.flops_before
    r.verified = site.verified
    return r
