"""Shipping a pruned model: structured slimming, export to torch.export / ONNX, compact sparse storage."""
from deploy.api import FORMATS, ExportResult, export_model
from deploy.formats import load_program, load_sparse, save_onnx, save_program, save_sparse
from deploy.semi_structured import semi_structured
from deploy.slim import FoldedConv2d, SlimError, SlimReport, count_macs, slim

__all__ = ["FORMATS", "ExportResult", "FoldedConv2d", "SlimError", "SlimReport", "count_macs", "export_model",
           "load_program", "load_sparse", "save_onnx", "save_program", "save_sparse", "semi_structured", "slim"]
