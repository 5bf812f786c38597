"""Base models: detect what MODEL is, load its components, add LoRA adapters."""
from dreambooth.models.builtin import BUILTIN_NAMES, builtin_path, cache_root
from dreambooth.models.components import Components, load_components, model_folder, model_identity
from dreambooth.models.source import ModelSource, detect_source, hub_offline

__all__ = ["BUILTIN_NAMES", "Components", "ModelSource", "builtin_path", "cache_root",
           "detect_source", "hub_offline", "load_components", "model_folder", "model_identity"]
