"""qod_lightning: QLoRA SFT and hand-written DPO that teach an LLM to write CAMARA QoD requests."""

__version__ = "0.1.0"
