"""Text sources and calibration windows."""

from .calibration import calibration_windows, eval_tokens
from .text import load_documents, load_text, resolve_file

__all__ = ["calibration_windows", "eval_tokens", "load_documents", "load_text", "resolve_file"]
