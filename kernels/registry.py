"""The feature-map registry: every per-kernel fact lives on the map's class.

A feature map is one ``FeatureMap`` subclass registered with ``@register_feature_map(name)``.
Besides ``forward`` it declares, as class attributes and class methods (``REQUIRED_FACTS``):

    takes_num_features   bool: ``num_features`` sets m (False: m is always
                         ``default_num_features(head_dim)`` and num_features is refused)
    default_num_features(head_dim) -> int: m when num_features is not given
    flops(rows, dh, m, *, is_query, causal, groups) -> MapFlops: FLOPs of applying the map
                         to ``rows`` vectors, in ``cost_model.site_flops``' conventions
    auto_role            "pretrained": a ``kernel="auto"`` candidate always (it approximates a
                         pretrained softmax without training); "trainable": a candidate only
                         when the model will be trained (``pretrained=False``); None: never
    triton_code          int: the ``FMAP`` code of its branch in ``triton_kernels._phi`` /
                         ``_dphi`` (unique, not TRITON_IDENTITY); None: no in-kernel branch,
                         backend="triton" computes phi(q), phi(k) with the module in PyTorch
                         and runs the fused core with the identity map (TRITON_IDENTITY)

and optional facts with defaults: ``causal_stabilized`` (``causal_key_features`` returns a
per-key log scale; the causal core then runs the stabilized recurrence) and ``weight_shapes``
(the tensors ``recipe_check`` verifies against a saved recipe).

A kernel that is not "phi(q), phi(k), then the linear core" (EVA, ``kernels/eva.py``) sets
``custom_attention = True`` and supplies the whole core after the low-rank projection:

    attend(q, k, v, *, key_padding_mask, causal, scale, eps, chunk_size) -> Tensor
                         what ``reference.attention_core`` returns (called instead of it)
    attention_flops(*, B, N, K, H, Hkv, dh, m, causal, key_spacing) -> MapFlops
                         its FLOPs over K keys (``cost_model.site_flops`` counts these instead
                         of the map and the linear core; key_spacing (dk, max_seq_len) on a
                         low-rank site, else None)
    attend_window(q, k, v, *, window, log_weight, scale, causal, key_padding_mask, kernel_k,
                  kernel_v, kernel_keep) -> Tensor
                         the sliding-window hybrid with this core outside the window (called
                         instead of ``window.window_attention``; same arguments but the map)
    window_flops(*, B, N, H, Hkv, dh, m, causal, window, dk) -> MapFlops
                         its FLOPs (``cost_window.window_core_flops`` returns these)

It still declares every REQUIRED_FACT (``forward`` / ``flops`` describe its feature map, if
any); it has no Triton kernel: ``backend="triton"`` raises, ``"auto"`` runs the reference.

"softmax" (SOFTMAX) is a kernel choice but not a registry entry: it has no feature map (exact
attention, or Linformer with dk), so none of these facts; ``FlurkaAttention.feature_map`` is
None for it. ``kernel_names()`` is the maps in registration order, then "softmax";
``kernel_choices()`` adds "auto" (AUTO). ``NameView`` exposes such a list as a constant that
stays current when a map is registered later (``KERNELS``, ``KERNEL_CHOICES``, ...).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Iterator, NamedTuple, Sequence

import torch.nn as nn
from torch import Tensor

SOFTMAX = "softmax"  # exact attention (dk None) or Linformer (dk set): no feature map
AUTO = "auto"  # kernel chosen per site by the cost model
AUTO_ROLES = ("pretrained", "trainable", None)
TRITON_IDENTITY = 0  # FMAP code of the identity map (phi computed in PyTorch beforehand)
# Per element of torch.softmax: max, subtract, exp, sum, divide (site_flops' convention).
SOFTMAX_ELEMWISE = 5
REQUIRED_FACTS = ("takes_num_features", "default_num_features", "flops", "auto_role",
                  "triton_code")


class MapFlops(NamedTuple):
    """FLOPs of applying a map: ``gemm`` matrix-product FLOPs (2 per multiply-add, what
    ``FlopCounterMode`` counts), ``elem`` elementwise ones (1 per output element, reductions 1
    per input element, casts and selections free), ``exp`` the exp-like part of ``elem`` (exp,
    elu, sigmoid, softplus: what calibration prices separately)."""

    gemm: int
    elem: int
    exp: int


class FeatureMap(nn.Module):
    """Base class of the feature maps. Subclasses set ``num_features`` in ``__init__``
    (accepting and ignoring unknown keyword arguments), implement ``forward`` and declare the
    facts of the module docstring."""

    name: ClassVar[str] = "?"
    takes_num_features: ClassVar[bool]
    auto_role: ClassVar[str | None]
    triton_code: ClassVar[int | None]
    causal_stabilized: ClassVar[bool] = False
    # saved tensor (relative to the map) -> its shape; entries are ints or the names
    # "head_dim", "kv_heads", "num_features" (recipe_check resolves them)
    weight_shapes: ClassVar[dict[str, tuple[int | str, ...]]] = {}
    custom_attention: ClassVar[bool] = False  # True: ``attend`` computes the core (docstring)
    # phi(q).phi(k) estimates exp(s q.k) (the performer, EVA): a window's kernel part starts at
    # weight 1 beside the exact window (kernels/window.py, ``initial_log_weight``)
    estimates_softmax: ClassVar[bool] = False
    num_features: int

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        """m when ``num_features`` is not given (always, when not ``takes_num_features``)."""
        raise NotImplementedError

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        """FLOPs of phi for ``rows`` vectors of width dh (m features), as ``forward``
        (``causal_key_features`` for causal keys) computes them; ``groups``: the number of
        (batch, kv-head) groups of the keys (a per-group stabilizer costs per group)."""
        raise NotImplementedError

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, Hx, N, dh) -> phi(x): (B, Hx, N, m) in fp32.

        key_mask: optional bool (B, 1 or Hx, N, 1), True where a key is real; only the
        performer uses it (padded keys are left out of its stabilizer).
        """
        raise NotImplementedError

    def formula(self, x: Tensor, *, is_query: bool) -> Tensor:
        """The map written as its plain formula, without any stabilizer (test oracle)."""
        return self.forward(x, is_query=is_query)

    def causal_key_features(
        self, x: Tensor, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """phi(k) for causal attention, and an optional per-key log scale (B, Hx, N).

        A stabilizer shared by all keys would let a future key change the scale of past ones
        (and, through underflow and eps, the output). Maps that need one (the performer,
        ``causal_stabilized``) return phi(k_j) / exp(log_scale_j) with log_scale_j depending
        on key j only; the causal kernel rescales by a running maximum. Maps without a
        stabilizer return (phi, None)."""
        return self.forward(x, is_query=False, key_mask=key_mask), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
               causal: bool = False, scale: float | None = None, eps: float = 1e-6,
               chunk_size: int = 64) -> Tensor:
        """The whole attention core, for a ``custom_attention`` map: q (B, H, N, dh), k
        (B, Hkv, K, dh), v (B, Hkv, K, dv) -> (B, H, N, dv) in q's dtype."""
        raise NotImplementedError(f"{type(self).__name__} is not a custom_attention map")

    def attend_window(self, q: Tensor, k: Tensor, v: Tensor, *, window: int,
                      log_weight: Tensor, scale: float, causal: bool = False,
                      key_padding_mask: Tensor | None = None, kernel_k: Tensor | None = None,
                      kernel_v: Tensor | None = None,
                      kernel_keep: Tensor | None = None) -> Tensor:
        """The sliding-window hybrid with this map's own core for the keys outside the window,
        for a ``custom_attention`` map (arguments: ``window.window_attention``'s)."""
        raise NotImplementedError(f"{type(self).__name__} is not a custom_attention map")

    @classmethod
    def attention_flops(cls, *, B: int, N: int, K: int, H: int, Hkv: int, dh: int, m: int,
                        causal: bool, key_spacing: tuple[int, int] | None = None) -> MapFlops:
        """FLOPs of ``attend`` over K keys, for a ``custom_attention`` map."""
        raise NotImplementedError(f"{cls.__name__} is not a custom_attention map")

    @classmethod
    def window_flops(cls, *, B: int, N: int, H: int, Hkv: int, dh: int, m: int, causal: bool,
                     window: int, dk: int | None) -> MapFlops:
        """FLOPs of ``attend_window``, for a ``custom_attention`` map that has one."""
        raise NotImplementedError(f"{cls.__name__} has no windowed form")

    @classmethod
    def has_window_form(cls) -> bool:
        """Whether ``window=`` can combine with this map: every linear-core map, and a
        ``custom_attention`` map that overrides ``attend_window``."""
        return not cls.custom_attention or cls.attend_window is not FeatureMap.attend_window

    def penalty(self) -> Tensor | None:
        """Optional regularizer to add to the training loss (ffk orthogonality)."""
        return None


FEATURE_MAPS: dict[str, type[FeatureMap]] = {}


def missing_facts(cls: type) -> list[str]:
    """The REQUIRED_FACTS that ``cls`` (or a map class it derives from) does not declare, and
    those declared with a wrong type; [] for a complete map."""
    if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
        return ["a FeatureMap subclass"]
    own = [c for c in cls.__mro__ if issubclass(c, FeatureMap) and c is not FeatureMap]
    out = [f for f in REQUIRED_FACTS if not any(f in vars(c) for c in own)]
    if "takes_num_features" not in out and not isinstance(cls.takes_num_features, bool):
        out.append("takes_num_features (a bool)")
    if "auto_role" not in out and cls.auto_role not in AUTO_ROLES:
        out.append(f"auto_role (one of {AUTO_ROLES})")
    code = getattr(cls, "triton_code", None)
    if "triton_code" not in out and code is not None and (
            isinstance(code, bool) or not isinstance(code, int) or code == TRITON_IDENTITY):
        out.append(f"triton_code (None or an int other than {TRITON_IDENTITY})")
    if getattr(cls, "custom_attention", False):
        if code is not None:
            out.append("triton_code None (a custom_attention map has no Triton kernel)")
        out += [f"{f} (a custom_attention map supplies it)" for f in ("attend", "attention_flops")
                if not any(f in vars(c) for c in own)]
    return out


def register_feature_map(name: str) -> Callable[[type[FeatureMap]], type[FeatureMap]]:
    """Class decorator: make a ``FeatureMap`` subclass the kernel ``name``. Refuses a class
    that lacks a declared fact, a taken name and a Triton code already in use."""

    def deco(cls: type[FeatureMap]) -> type[FeatureMap]:
        if not isinstance(name, str) or not name.isidentifier() or name in (SOFTMAX, AUTO):
            raise ValueError(f"feature map name must be an identifier other than {SOFTMAX!r} "
                             f"and {AUTO!r}; got {name!r}")
        if name in FEATURE_MAPS:
            raise ValueError(f"feature map {name!r} is already registered "
                             f"({FEATURE_MAPS[name].__qualname__}); unregister it first")
        missing = missing_facts(cls)
        if missing:
            raise TypeError(f"feature map {name!r} ({getattr(cls, '__qualname__', cls)}) does "
                            f"not declare {', '.join(missing)}; see kernels/registry.py")
        code = cls.triton_code
        taken = {c.triton_code: n for n, c in FEATURE_MAPS.items()}
        if code is not None and code in taken:
            raise ValueError(f"feature map {name!r}: triton_code {code} is {taken[code]!r}'s")
        cls.name = name
        FEATURE_MAPS[name] = cls
        return cls

    return deco


def unregister_feature_map(name: str) -> type[FeatureMap]:
    """Remove the map ``name`` from the registry (tests register toy maps); returns its class."""
    try:
        return FEATURE_MAPS.pop(name)
    except KeyError:
        raise ValueError(f"no feature map {name!r} is registered") from None


def build_feature_map(name: str, **kwargs) -> FeatureMap:
    """Build the feature map registered as ``name`` (keyword arguments go to its class)."""
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(
            f"unknown feature map {name!r}; expected one of {', '.join(sorted(FEATURE_MAPS))}"
        ) from None
    return cls(**kwargs)


# -- lists and look-ups derived from the registry --------------------------------------------
def kernel_names() -> tuple[str, ...]:
    """Every kernel FlurkaAttention accepts: the maps in registration order, then softmax."""
    return (*FEATURE_MAPS, SOFTMAX)


def kernel_choices() -> tuple[str, ...]:
    """Every ``kernel=`` a conversion accepts: ``kernel_names()`` and "auto"."""
    return (*kernel_names(), AUTO)


def auto_candidates(pretrained: bool) -> tuple[str, ...]:
    """The kernels ``kernel="auto"`` picks among, in tie-break order (earlier wins): the maps
    whose ``auto_role`` is "pretrained" (and, for a model that will be trained, "trainable"),
    in registration order, then softmax."""
    roles = ("pretrained",) if pretrained else ("pretrained", "trainable")
    return (*(n for n, c in FEATURE_MAPS.items() if c.auto_role in roles), SOFTMAX)


def num_features_kernels() -> tuple[str, ...]:
    """The kernels whose ``num_features`` sets m (``takes_num_features``)."""
    return tuple(n for n, c in FEATURE_MAPS.items() if c.takes_num_features)


def triton_codes() -> dict[str, int]:
    """FMAP code per in-kernel map, with "identity" (TRITON_IDENTITY) first."""
    return {"identity": TRITON_IDENTITY, **{n: c.triton_code for n, c in FEATURE_MAPS.items()
                                            if c.triton_code is not None}}


def check_kernel(kernel: object, *, auto: bool = False) -> str:
    """``kernel`` if it names a kernel (or "auto" when allowed); else ValueError listing them."""
    names = kernel_choices() if auto else kernel_names()
    if not isinstance(kernel, str) or kernel not in names:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(names)}")
    return kernel


def feature_map_class(kernel: str) -> type[FeatureMap] | None:
    """The map class of ``kernel``, None for softmax; unknown kernels raise ValueError."""
    check_kernel(kernel)
    return None if kernel == SOFTMAX else FEATURE_MAPS[kernel]


def takes_num_features(kernel: str) -> bool:
    """True when ``num_features`` sets m for ``kernel`` (False for softmax)."""
    cls = feature_map_class(kernel)
    return cls is not None and cls.takes_num_features


class NameView(Sequence):
    """A read-only tuple of names recomputed from the registry on every use, so a constant such
    as ``KERNELS`` includes a map registered after it was imported. Compares equal to the
    tuple it currently holds."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names = names

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (NameView, tuple, list)):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())
