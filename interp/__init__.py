"""Model-agnostic interpretability engine: loading, components, ablations, patching, attribution."""
from interp.models import DEFAULT_MODEL, EMBEDDED, ModelLoadError, load_model

__all__ = ["load_model", "ModelLoadError", "EMBEDDED", "DEFAULT_MODEL"]
