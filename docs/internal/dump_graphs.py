"""Evidence for docs/internal/hf_graphs.md: how each zoo model's attention looks when captured.

For every model of tests/zoo_hf.py and every attn_implementation it records:
  * whether torch.fx.symbolic_trace works on the whole model, the first attention module and
    the layer holding it (exact error otherwise);
  * the args/kwargs the attention module really receives (forward hook, with_kwargs=True);
  * whether torch.export works on the attention module with those inputs, static and with a
    dynamic sequence length (Dim.AUTO on every dim equal to the sequence length), and its ATen
    op sequence; what the module returns.

    .venv/bin/python docs/internal/dump_graphs.py [model ...] [--impl sdpa|eager] [--ops] [--no-pad]
    .venv/bin/python docs/internal/dump_graphs.py --roundtrip     # ep.module() == original site
"""
from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
import time
import traceback
from typing import Any

import torch
import torch.fx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
import zoo_hf


def _err(e: BaseException) -> str:
    """One-line exception summary: type, first line of the message, innermost transformers line."""
    msg = str(e).strip().splitlines()
    where = ""
    for fr in traceback.extract_tb(e.__traceback__):
        if "/transformers/" in fr.filename:
            src = (fr.line or '').strip()[:70]
            where = f" @ {fr.filename.split('/transformers/')[-1]}:{fr.lineno} `{src}`"
    return f"{type(e).__name__}: {msg[0][:110] if msg else ''}{where}"


def describe(x: Any) -> str:
    """Short description of a recorded argument (tensor shape/dtype and mask values)."""
    if isinstance(x, torch.Tensor):
        s = f"{x.dtype}{tuple(x.shape)}".replace("torch.", "")
        if x.dtype == torch.bool:
            s += f" bool(true={int(x.sum())}/{x.numel()})"
        elif x.is_floating_point() and x.dim() == 4:
            u = torch.unique(x)
            fmin = torch.finfo(x.dtype).min
            if u.numel() <= 3:
                vals = ["finfo.min" if v == fmin else ("-inf" if v == float("-inf") else f"{v:g}")
                        for v in u.tolist()]
                s += " values{" + ",".join(vals) + "}"
            else:
                s += f" {u.numel()} distinct values, min={x.min().item():.3g}"
        return s
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x)
    return type(x).__name__


def record(model: torch.nn.Module, inputs: dict, paths: list[str]) -> dict[str, tuple]:
    """Run the model once; return {path: (args, kwargs, output)} of each module's first call."""
    seen: dict[str, tuple] = {}
    handles = []
    for p in paths:
        mod = model.get_submodule(p)

        def hook(m, args, kwargs, out, p=p):
            seen.setdefault(p, (args, dict(kwargs), out))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def try_trace(mod: torch.nn.Module, concrete: dict | None = None) -> str:
    """symbolic_trace a module (optionally with concrete_args): 'ok (n nodes)' or the exact
    error."""
    try:
        gm = torch.fx.symbolic_trace(mod, concrete_args=concrete)
        return f"ok ({len(gm.graph.nodes)} nodes)"
    except Exception as e:  # noqa: BLE001 - we record whatever fails
        return "FAIL " + _err(e)


def _dyn_spec(x: Any, n_set: set[int]) -> Any:
    """Dim.AUTO on every tensor dim whose size is a sequence length; mirrors the input tree."""
    if isinstance(x, torch.Tensor):
        dims = {i: torch.export.Dim.AUTO for i, s in enumerate(x.shape) if s in n_set and i > 0}
        return dims or None
    if isinstance(x, (tuple, list)):
        return type(x)(_dyn_spec(v, n_set) for v in x)
    return None


class _Bound(torch.nn.Module):
    """Calls `mod(**consts, **dict(zip(names, tensors)))`: only tensors are graph inputs."""

    def __init__(self, mod: torch.nn.Module, names: list[str], consts: dict) -> None:
        super().__init__()
        self.mod, self.names, self.consts = mod, names, consts

    def forward(self, *tensors):
        return self.mod(**self.consts, **dict(zip(self.names, tensors)))


def _is_tensor_tree(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, (tuple, list)) and bool(x) and all(isinstance(v, torch.Tensor) for v in x))


def try_export(mod: torch.nn.Module, args: tuple, kwargs: dict, n_set: set[int] | None):
    """torch.export (non-strict) with the recorded inputs; returns (status, ExportedProgram|None).

    Static: export(mod, args, kwargs) exactly as recorded. Dynamic (n_set given): positional
    args are turned into kwargs and non-tensor kwargs (None, bools) are bound in a wrapper,
    because a None/bool leaf inside **kwargs breaks the dynamic_shapes tree match
    ("AssertionError: Must provide a tree_name when there might be a mismatch")."""
    try:
        if n_set is None:
            ep = torch.export.export(mod, args, kwargs, strict=False)
            return "ok", ep
        params = list(inspect.signature(mod.forward).parameters)
        allkw = {**dict(zip(params, args)), **kwargs}
        names = [k for k, v in allkw.items() if _is_tensor_tree(v)]
        consts = {k: v for k, v in allkw.items() if k not in names}
        tensors = tuple(allkw[k] for k in names)
        dyn = tuple(_dyn_spec(t, n_set) for t in tensors)
        ep = torch.export.export(_Bound(mod, names, consts), tensors, dynamic_shapes=(dyn,),
                                 strict=False)
        syms = set()
        for node in ep.graph.nodes:
            if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
                syms |= {str(s) for s in node.meta["val"].shape if not isinstance(s, int)}
        return f"ok dyn={','.join(sorted(syms)) or 'NONE (specialized)'}", ep
    except Exception as e:  # noqa: BLE001
        return "FAIL " + _err(e), None


def sdpa_calls(ep) -> list[str]:
    """The arguments of each scaled_dot_product_attention node (mask, is_causal, scale, gqa)."""
    out = []
    for node in ep.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
            a = list(node.args[3:]) + [f"{k}={v}" for k, v in node.kwargs.items()]
            out.append(f"sdpa(q,k,v, {', '.join(str(x) for x in a)})")
    return out


def op_sequence(ep) -> list[str]:
    """ATen ops of an exported program in graph order, without the `aten.` / `.default`."""
    ops = []
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = str(node.target).replace("aten.", "").replace(".default", "")
            ops.append(name)
    return ops


def layer_path(path: str) -> str:
    """Path of the layer holding an attention module: up to the first numeric component."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return path


def dump_site(model: torch.nn.Module, site, rec: tuple, rec_nc: tuple | None, lens: set[int],
              show_ops: bool) -> None:
    """Print trace/export facts for one site from its recorded (args, kwargs, output)."""
    mod = model.get_submodule(site.path)
    args, kwargs, out = rec
    print(f"- site {site.path} [{type(mod).__name__}] causal={site.causal} cross={site.cross}")
    print(f"  args: {[describe(a) for a in args]}")
    for k, v in kwargs.items():
        print(f"  kw {k}: {describe(v)}")
    print(f"  returns: {describe(out)}")
    print(f"  symbolic_trace(attn): {try_trace(mod)}")
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)
                and k in inspect.signature(mod.forward).parameters}
    if concrete:
        traced = try_trace(mod, concrete)
        print(f"  symbolic_trace(attn, concrete_args={sorted(concrete)}): {traced}")
    lp = layer_path(site.path)
    print(f"  symbolic_trace(layer {lp} [{type(model.get_submodule(lp)).__name__}]): "
          f"{try_trace(model.get_submodule(lp))}")
    st, ep = try_export(mod, args, kwargs, None)
    print(f"  export(attn, static, recorded kwargs): {st}")
    if rec_nc is not None:
        args, kwargs, _ = rec_nc
        print("  with model(use_cache=False) the kwargs are: "
              + ", ".join(f"{k}={describe(v)}" for k, v in kwargs.items()
                          if not isinstance(v, torch.Tensor)))
        st, ep = try_export(mod, args, kwargs, None)
        print(f"  export(attn, static, use_cache=False): {st}")
    n_set = set(lens) | {a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() == 3}
    st2, _ = try_export(mod, args, kwargs, n_set)
    print(f"  export(attn, Dim.AUTO on seq dims {sorted(n_set)}): {st2}")
    if ep is not None and show_ops:
        print("  ops: " + " -> ".join(op_sequence(ep)))
        for c in sdpa_calls(ep):
            print(f"  {c}")
        outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
        kinds = [str(o) if o is None else 'tensor' for o in outs]
        print(f"  exported outputs: {len(outs)} ({kinds})")


def dump(name: str, impl: str, show_ops: bool, no_pad: bool = False) -> None:
    """Print the capture facts for one zoo model and implementation (first site of each kind)."""
    t0 = time.perf_counter()
    e = zoo_hf.build(name, impl)
    model, inputs = e.model, dict(e.example_inputs)
    if no_pad:  # all-ones masks: HF then passes mask=None to sdpa / encoder eager sites
        inputs = {k: torch.ones_like(v) if "attention_mask" in k else v for k, v in inputs.items()}
    print(f"\n## {name} / {impl}{' / no padding' if no_pad else ''}  "
          f"({type(model).__name__}, {e.expected_sites} sites)")
    print(f"whole-model symbolic_trace: {try_trace(model)}")
    paths = [s.path for s in e.sites]
    rec = record(model, inputs, paths)
    nocache = "use_cache" in inspect.signature(model.forward).parameters
    rec_nc = record(model, {**inputs, "use_cache": False}, paths) if nocache else None
    lens = {t.shape[-1] for t in inputs.values() if t.dim() == 2}
    seen = set()
    for s in e.sites:
        kwargs0 = rec[s.path][1]
        key = (type(model.get_submodule(s.path)).__name__, s.causal, s.cross,
               tuple(k for k, v in kwargs0.items() if v is not None))
        if key not in seen:   # one site per kind: layers of the same kind give the same graph
            seen.add(key)
            dump_site(model, s, rec[s.path], rec_nc[s.path] if rec_nc else None, lens, show_ops)
    print(f"({time.perf_counter() - t0:.1f} s)")


def _tensor_inputs(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], tuple]:
    """Names and values of the tensor inputs of a recorded call, in `_Bound` order."""
    params = list(inspect.signature(mod.forward).parameters)
    allkw = {**dict(zip(params, args)), **kwargs}
    names = [k for k, v in allkw.items() if _is_tensor_tree(v)]
    return names, tuple(allkw[k] for k in names)


def _shorter(inputs: dict, drop: int) -> dict:
    """Same inputs with `drop` fewer tokens; row 1 keeps 3 padded positions at the end."""
    out = {}
    for k, v in inputs.items():
        is_seq = isinstance(v, torch.Tensor) and v.dim() == 2
        out[k] = v[:, : v.shape[1] - drop].clone() if is_seq else v
        if "attention_mask" in k:
            out[k][1, -3:] = 0
    return out


def roundtrip(name: str, impl: str, drop: int = 4) -> None:
    """Export every site with a dynamic seq length at N, run `ep.module()` at N and N-drop and
    compare with the original module's recorded outputs (max abs diff)."""
    e = zoo_hf.build(name, impl)
    inputs = {k: v for k, v in e.example_inputs.items() if k != "labels"}
    if "use_cache" in inspect.signature(e.model.forward).parameters:
        inputs["use_cache"] = False
    paths = [s.path for s in e.sites]
    recs = [record(e.model, inputs, paths), record(e.model, _shorter(inputs, drop), paths)]
    n_set = {v.shape[-1] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() == 2}
    for args, kwargs, _ in recs[0].values():   # ViT: N comes from the hidden states
        n_set |= {t.shape[1] for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.dim() == 3}
    worst, status = 0.0, "ok"
    for p in paths:
        mod = e.model.get_submodule(p)
        st, ep = try_export(mod, *recs[0][p][:2], n_set)
        if ep is None:
            status = st
            continue
        names = _tensor_inputs(mod, *recs[0][p][:2])[0]
        for rec in recs:
            args, kwargs, out = rec[p]
            names2, tensors = _tensor_inputs(mod, args, kwargs)
            if names2 != names:
                status = f"FAIL inputs {names2} != exported {names}"
                continue
            worst = max(worst, (ep.module()(*tensors)[0] - out[0]).abs().max().item())
    print(f"{name:10s} {impl:5s} dynamic export round trip at N and N-{drop}: {status} "
          f"max|diff|={worst:.1e}")


def main() -> None:
    """Command line: models (default all), --impl, --ops."""
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(zoo_hf.ZOO))
    ap.add_argument("--impl", choices=zoo_hf.IMPLS, action="append")
    ap.add_argument("--ops", action="store_true", help="print the exported ATen op sequence")
    ap.add_argument("--no-pad", action="store_true", help="all-ones attention masks")
    ap.add_argument("--roundtrip", action="store_true",
                    help="only check ep.module() of the dynamic export against the original")
    a = ap.parse_args()
    for name in a.models:
        for impl in a.impl or zoo_hf.IMPLS:
            try:
                if a.roundtrip:
                    roundtrip(name, impl)
                else:
                    dump(name, impl, a.ops, a.no_pad)
            except Exception:  # noqa: BLE001
                traceback.print_exc()


if __name__ == "__main__":
    main()
