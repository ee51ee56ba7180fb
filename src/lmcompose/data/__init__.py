"""Text sources (local files first, the hub when online), calibration windows and evaluation tokens."""

from .calibration import calibration_windows, eval_tokens
from .text import NAMED, data_root, load_documents, load_text, read_rows, resolve_file

__all__ = ["NAMED", "calibration_windows", "data_root", "eval_tokens", "load_documents", "load_text",
           "read_rows", "resolve_file"]
