"""loraswitch: one base LLM, a folder of LoRA adapters, and routing that picks among them per token."""

__version__ = "0.1.0"
