"""Base models: detect what MODEL is, load its components, add LoRA adapters."""
from .builtin import BUILTIN_NAMES, builtin_path, cache_root
from .components import Components, load_components, model_folder, model_identity
from .source import ModelSource, detect_source

__all__ = ["BUILTIN_NAMES", "Components", "ModelSource", "builtin_path", "cache_root",
           "detect_source", "load_components", "model_folder", "model_identity"]
