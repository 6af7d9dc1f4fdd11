"""Loopbook's model backends behind one small protocol (see protocol.py)."""
from .engine import Engine
from .loader import load_backend
from .protocol import Backend, Figures, ModelError, Sampling
from .registry import MODELS, resolve

__all__ = ["Backend", "Engine", "Figures", "MODELS", "ModelError", "Sampling", "load_backend", "resolve"]
