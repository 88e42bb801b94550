"""flurka-rewrite: replace softmax attention in PyTorch models by FLuRKA attention.

    import flurka_rewrite as fr
    new_model = fr.convert(model, kernel="performer", dk=256)
    print(new_model.flurka_report)
"""
from .kernels.attention import FlurkaAttention
from .passes.config import RewriteConfig
from .convert import (AllSitesSkippedWarning, AlreadyConvertedWarning, DkNotBelowLengthWarning,
                      convert, plan)
from .report import RewriteReport, SiteReport
from .onnx_export import export_onnx
from .loading import load
from .saving import save
from .hf import install_from_pretrained_hook
from .distill import DistillResult, distill
from .decoding import DecodeState, init_state, step
from .onnx_step import OnnxStepExport, export_onnx_step
from .lora import FlurkaParametersNotSavedWarning, add_lora, flurka_parameters

__version__ = "0.1.0"

__all__ = ["FlurkaAttention", "RewriteConfig", "RewriteReport", "SiteReport", "convert", "plan",
           "__version__"]
__all__ += ["export_onnx", "load", "save", "distill", "DistillResult", "AllSitesSkippedWarning",
            "AlreadyConvertedWarning"]
__all__ += ["DecodeState", "init_state", "step", "export_onnx_step", "OnnxStepExport"]
__all__ += ["add_lora", "flurka_parameters", "FlurkaParametersNotSavedWarning"]
__all__ += ["DkNotBelowLengthWarning"]

install_from_pretrained_hook()  # from_pretrained restores conversions (docs/save_load.md)
