"""FLuRKA math: plain-PyTorch reference implementations (``reference``), feature maps
(``feature_maps``, each declaring its facts to the registry in ``registry``) and, where a GPU
or the Triton interpreter is present, Triton kernels.

This package never imports ``flurka_rewrite.passes``.
"""
from .feature_maps import FEATURE_MAPS, FeatureMap, build_feature_map, register_feature_map
from . import eva  # noqa: F401  (registers kernel "eva" after the maps of feature_maps)
from .registry import SOFTMAX, kernel_names, unregister_feature_map
from .reference import (
    causal_kernel_attention,
    flurka_attention,
    kernel_attention,
    lowrank_project,
    softmax_attention,
)

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "build_feature_map",
    "register_feature_map",
    "unregister_feature_map",
    "kernel_names",
    "SOFTMAX",
    "softmax_attention",
    "kernel_attention",
    "causal_kernel_attention",
    "lowrank_project",
    "flurka_attention",
]
