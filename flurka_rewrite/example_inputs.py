"""Example inputs for the CLI's conversion: from ``--example-shape B,N``, the inputs a
``.pt2`` recorded, a shape chosen for a Hugging Face text model (``default_shape``), or its
``dummy_inputs``."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flurka_rewrite.io import LoadedModel, UsageError

def _embedding_vocab(module: nn.Module) -> int | None:
    """Vocabulary size of the first embedding: an nn.Embedding, or an aten.embedding node of
    an exported graph."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            w = node.args[0]
            if getattr(w, "op", None) == "get_attr":
                return int(module.get_parameter(w.target).shape[0])
            val = getattr(w, "meta", {}).get("val")
            if val is not None:
                return int(val.shape[0])
    return None


def _first_layer(module: nn.Module) -> nn.Module | None:
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


# The CLI's own example for a Hugging Face text model: batch 2, the model's position limit
# capped at this length (the compiler's padded probe then pads the last row).
DEFAULT_BATCH, DEFAULT_MAX_LEN = 2, 512


def default_shape(loaded: LoadedModel) -> tuple[int, int] | None:
    """(B, N) for a Hugging Face model that takes token ids: batch 2 and its position limit
    (``max_position_embeddings`` and the like) capped at 512, or 512 when it states none;
    None for other inputs (a ``.pt2``'s recorded inputs, images: ``dummy_inputs``)."""
    config, model = loaded.hf_config, loaded.module
    if config is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    if not (getattr(config, "vocab_size", None) or _embedding_vocab(model)):
        return None
    from flurka_rewrite.passes.probe import position_limit

    limit = position_limit(model)
    return DEFAULT_BATCH, min(limit[0] if limit else DEFAULT_MAX_LEN, DEFAULT_MAX_LEN)


def example_inputs_for(loaded: LoadedModel, shape: tuple[int, int] | None,
                       seed: int = 0) -> tuple[Any, ...] | dict[str, Any] | None:
    """Example inputs for ``convert``: from ``--example-shape B,N`` when given, else the
    inputs recorded in the file (.pt2), the model's ``dummy_inputs`` (Hugging Face), or None
    (the compiler then traces without inputs)."""
    g = torch.Generator().manual_seed(seed)
    model = loaded.module
    if shape is None:
        if loaded.recorded_inputs is not None:
            args, kwargs = loaded.recorded_inputs
            return _args_or_kwargs(args, kwargs)
        if loaded.kind == "demo":
            from flurka_rewrite.demo import demo_inputs

            return demo_inputs()
        dummy = getattr(model, "dummy_inputs", None)
        return dict(dummy) if isinstance(dummy, dict) else None
    B, N = shape
    vocab = _embedding_vocab(model)
    if loaded.hf_config is not None:
        vocab = getattr(loaded.hf_config, "vocab_size", None) or vocab
        if getattr(model, "main_input_name", "input_ids") != "input_ids" or not vocab:
            raise UsageError(f"--example-shape B,N builds token ids, but {type(model).__name__} "
                             f"takes {getattr(model, 'main_input_name', '?')!r}; omit "
                             "--example-shape to use the model's dummy inputs")
        from flurka_rewrite.passes.probe import position_limit

        limit = position_limit(model)
        if limit and N > limit[0]:
            raise UsageError(f"--example-shape {B},{N}: {type(model).__name__} takes at most "
                             f"{limit[0]} positions ({limit[1]} in its config.json); choose "
                             f"N <= {limit[0]}")
        ids = torch.randint(0, vocab, (B, N), generator=g)  # (B, N)
        inputs = {"input_ids": ids, "attention_mask": torch.ones(B, N, dtype=torch.long)}
        if getattr(loaded.hf_config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids.clone()
        return inputs
    if loaded.kind == "demo":
        from flurka_rewrite.demo import demo_inputs

        return demo_inputs(B, N, seed=seed)
    if loaded.recorded_inputs is not None:  # reshape the recorded inputs to (B, N, ...)
        args, kwargs = loaded.recorded_inputs
        make = lambda name, t: _like(t, name, B, N, vocab or 2, g)  # noqa: E731
        return _args_or_kwargs(tuple(make("", t) for t in args),
                               {k: make(k, t) for k, t in kwargs.items()})
    first = _first_layer(model)
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (B, N), generator=g),)  # (B, N)
    if isinstance(first, nn.Linear):
        return (torch.randn(B, N, first.in_features, generator=g),)  # (B, N, d)
    raise UsageError(f"cannot build inputs of shape {B},{N} for {type(model).__name__}, whose "
                     f"first layer is {type(first).__name__}; convert it from Python with "
                     "flurka_rewrite.convert(model, example_inputs=...)")


def _like(t: Any, name: str, B: int, N: int, vocab: int, g: torch.Generator) -> Any:
    """A new tensor like the recorded ``t`` with its first two dims set to (B, N)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    shape = (B, N, *t.shape[2:])
    if t.dtype == torch.bool or "mask" in name:
        return torch.ones(shape, dtype=t.dtype)
    if t.dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(t.dtype)
    return torch.randint(0, vocab, shape, generator=g).to(t.dtype)


def _args_or_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | dict:
    if args and kwargs:
        raise UsageError("the recorded inputs mix positional and keyword arguments, which "
                         "convert cannot take; pass --example-shape")
    return dict(kwargs) if kwargs else tuple(args)


def seq_len_of(inputs: tuple[Any, ...] | dict[str, Any] | None) -> int | None:
    """N of the first 2-D-or-more tensor among the example inputs."""
    values = inputs.values() if isinstance(inputs, dict) else (inputs or ())
    for t in values:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[1])
    return None


def shape_text(inputs: tuple[Any, ...] | dict[str, Any]) -> str:
    """'2x512': (B, N) of the first 2-D-or-more tensor among the example inputs."""
    values = inputs.values() if isinstance(inputs, dict) else inputs
    t = next((v for v in values if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    return "x".join(str(d) for d in t.shape[:2]) if t is not None else "given"
