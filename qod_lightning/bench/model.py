"""The model both frameworks train: its load settings and the stand-in SFT adapter DPO starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qod_lightning.bench.options import StageSpec


def weight_dtype(device: str) -> str:
    """Dtype of the base weights and 4-bit compute: bf16 on a GPU, fp32 on the CPU (no bf16 units)."""
    return "bfloat16" if device == "cuda" else "float32"


def model_settings(spec: StageSpec) -> Any:
    """The :class:`~qod_lightning.model.ModelSettings` both frameworks load ``spec``'s model with."""
    from qod_lightning.model import LoRASettings, ModelSettings, QuantizationSettings

    dtype = weight_dtype(spec.device)
    return ModelSettings(
        model_name_or_path=spec.model_path,
        adapter_path=spec.adapter_path,
        dtype=dtype,
        attn_implementation="sdpa",
        gradient_checkpointing=spec.gradient_checkpointing,
        lora=LoRASettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout),
        quantization=QuantizationSettings(load_in_4bit=spec.quant == "4bit", compute_dtype=dtype),
    )


def make_start_adapter(
    model_path: str,
    out_dir: str | Path,
    r: int = 16,
    alpha: int = 16,
    seed: int = 0,
    scale: float = 0.02,
    dtype: str = "float32",
) -> Path:
    """Save a stand-in for an SFT adapter: PEFT's ``A`` init and ``B ~ N(0, scale^2)``, dropout 0.

    DPO starts from an SFT adapter; a new adapter (``B = 0``) would make the policy equal the base
    model and the reference trivially so. A non-zero ``B`` makes the agreement check meaningful.
    Dropout is 0 because TRL's ``DPOConfig.disable_dropout`` (default ``True``) zeroes it and ours
    takes it from the adapter's config.

    Args:
        model_path: Base model directory.
        out_dir: Where the adapter goes.
        r: LoRA rank.
        alpha: LoRA alpha.
        seed: Seed of ``A`` and ``B``.
        scale: Standard deviation of ``B``.
        dtype: Dtype the base model is loaded in (``bfloat16`` halves the memory of a large model).

    Returns:
        ``out_dir``.
    """
    from qod_lightning.model import LoRASettings, ModelSettings, build_model

    torch.manual_seed(seed)
    model = build_model(ModelSettings(model_path, dtype=dtype, lora=LoRASettings(r=r, alpha=alpha, dropout=0.0)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    return Path(out_dir)
