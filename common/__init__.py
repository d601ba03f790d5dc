"""Shared library of the phi3v-recipes fine-tuning scripts: the native Phi-3.5-vision model and processor."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_phi3v import Phi3VConfig
from .modeling_phi3v import Phi3VForCausalLM

# Registered so AutoConfig/AutoModelForCausalLM resolve "phi3_v" to our classes, never to the hub's remote code.
AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM"]
