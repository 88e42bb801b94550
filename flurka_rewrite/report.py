"""The rewrite report (DESIGN section 5): one ``SiteReport`` per attention site found."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
    mask: str | None = None  # "none" | "padding" | "causal" | "additive" | "bool" | ...
    hoisted: bool | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    params_added: int | None = None
    rel_error: float | None = None  # measured on the example inputs, when given


@dataclass
class RewriteReport:
    """All sites of one conversion, in graph order."""

    sites: list[SiteReport] = field(default_factory=list)
    model: str | None = None  # class name of the converted model
    config: dict[str, Any] = field(default_factory=dict)  # the options used (JSON-able)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return {"model": self.model, "config": self.config,
                "sites": [asdict(s) for s in self.sites]}

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RewriteReport":
        """Inverse of ``to_dict``."""
        names = {f.name for f in fields(SiteReport)}
        sites = [SiteReport(**{k: v for k, v in s.items() if k in names}) for s in d["sites"]]
        return cls(sites=sites, model=d.get("model"), config=d.get("config", {}))
