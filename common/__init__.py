"""Shared library of the phi3v-recipes fine-tuning scripts: the native Phi-3.5-vision model and processor.

Imports are lazy so that light tools (`python -m common.synthetic`, the UCF-101 converter's workers) do not
pay for torch and transformers. Using the model class (or importing `common.model.modeling_phi3v`) also registers
"phi3_v" with AutoConfig/AutoModelForCausalLM, so the Auto classes never reach for the checkpoint's remote code.
"""

from importlib import import_module

_EXPORTS = {
    "Phi3VConfig": "model.configuration_phi3v",
    "Phi3VForCausalLM": "model.modeling_phi3v",
    "Phi3VImageProcessor": "model.image_processing_phi3v",
    "Phi3VProcessor": "model.processing_phi3v",
    "Phi3VCollator": "data.collator",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'common' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
