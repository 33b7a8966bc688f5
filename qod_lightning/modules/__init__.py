"""LightningModules: supervised fine-tuning and DPO."""

from qod_lightning.modules.dpo import DPOModule
from qod_lightning.modules.sft import SFTModule

__all__ = ["DPOModule", "SFTModule"]
