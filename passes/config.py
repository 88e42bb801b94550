"""``RewriteConfig``: the options of ``convert`` / ``plan``, validated once (docs/design.md §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flurka_rewrite.kernels.attention import check_window
from flurka_rewrite.kernels.dispatch import BACKENDS
from flurka_rewrite.kernels.registry import (
    AUTO,
    SOFTMAX,
    NameView,
    check_kernel,
    kernel_choices,
    num_features_kernels,
    takes_num_features,
)

# The registered feature maps, "softmax" and "auto"; recomputed on use (kernels/registry.py).
KERNEL_CHOICES = NameView(kernel_choices)
E_INIT_CHOICES = ("pool", "gaussian")


@dataclass(frozen=True)
class RewriteConfig:
    """Conversion options. Invalid values raise ``ValueError`` naming the valid ones.

    kernel: a registered feature map, "softmax" (exact or Linformer) or "auto" (cost model).
    dk: rank of the sequence projection; None = no low-rank; "auto" = cost model.
    num_features: m for the maps that take it (performer, ffk; None: chosen per site).
    backend: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton".
    filter_fn: (module_path, site) -> bool; False leaves that site as it is.
    e_init: initialisation of E, F ("pool" or "gaussian").
    max_seq_len: longest key sequence a low-rank layer accepts (None: taken from the
        example inputs, else from the model's config, else an error).
    hoist: down-sample the layer input before the K/V projections where legal.
    window: None, or w: exact softmax over the w nearest keys beside the kernel part, one
        shared normaliser (kernels/window.py); any kernel but exact softmax, backend "torch"
        or "auto" (the reference), self-attention sites only.
    keep_exact: keep the K sites with the largest measured error as the original (exact)
        attention (hybrid by layer; needs example inputs, where the errors are measured).
    max_rel_error: keep as the original attention every site whose measured error on the
        example inputs exceeds this (the fewest sites that meet the budget).
    """

    kernel: str = "auto"
    dk: int | str | None = 256
    num_features: int | None = None
    backend: str = "auto"
    seed: int = 0
    filter_fn: Callable[[str, Any], bool] | None = None
    inplace: bool = False
    e_init: str = "pool"
    max_seq_len: int | None = None
    hoist: bool = True
    window: int | None = None
    keep_exact: int | None = None
    max_rel_error: float | None = None

    @property
    def exact(self) -> bool:
        """Exact mode (``kernel="softmax", dk=None``): every output must equal the original's."""
        return self.kernel == SOFTMAX and self.dk is None

    def __post_init__(self) -> None:
        check_kernel(self.kernel, auto=True)
        dk = self.dk
        if isinstance(dk, bool) or not (dk is None or dk == "auto" or isinstance(dk, int)):
            raise ValueError(f"dk must be a positive int, None or 'auto'; got {dk!r}")
        if isinstance(dk, int) and dk < 1:
            raise ValueError(f"dk must be a positive int, None or 'auto'; got {dk}")
        nf = self.num_features
        if nf is not None and (isinstance(nf, bool) or not isinstance(nf, int) or nf < 1):
            raise ValueError(f"num_features must be a positive int or None; got {nf!r}")
        if nf is not None and self.kernel != AUTO and not takes_num_features(self.kernel):
            which = " or ".join(f"kernel={k!r}" if i == 0 else repr(k)
                                for i, k in enumerate(num_features_kernels()))
            raise ValueError(f"num_features={nf} applies to {which}, not "
                             f"kernel={self.kernel!r}; drop num_features or change the kernel")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of "
                             f"{', '.join(BACKENDS)}")
        if self.e_init not in E_INIT_CHOICES:
            raise ValueError(f"unknown e_init {self.e_init!r}; expected one of "
                             f"{', '.join(E_INIT_CHOICES)}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError("filter_fn must be callable (module_path, site) -> bool")
        ml = self.max_seq_len
        if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 1):
            raise ValueError(f"max_seq_len must be a positive int or None; got {ml!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63); got {self.seed!r}")
        ke = self.keep_exact
        if ke is not None and (isinstance(ke, bool) or not isinstance(ke, int) or ke < 0):
            raise ValueError(f"keep_exact must be a non-negative int or None; got {ke!r}")
        mre = self.max_rel_error
        if mre is not None and (isinstance(mre, bool) or not isinstance(mre, (int, float))
                                or not mre > 0):
            raise ValueError(f"max_rel_error must be a positive number or None; got {mre!r}")
        check_window(self.window, self.kernel, self.dk, self.backend)
        for name in ("inplace", "hoist"):  # "no" is a truthy string: refuse, do not guess
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
