"""An exponential moving average of the adapter weights, for the weights a run ends with."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class AdapterEMA(L.Callback):
    """Keep an exponential moving average of the trainable weights and end training on it.

    After each optimizer step, ``shadow = decay * shadow + (1 - decay) * weight`` for every
    parameter that requires a gradient (the LoRA adapter: megabytes, not the frozen base model's
    weights). Validation runs on the averaged weights, so ``val/loss`` and the best adapter
    describe what will be saved; when training ends, the averaged weights replace the live ones,
    so the module's final adapter is the average.

    Why: at batch 1 or 2 and a high learning rate, the last few steps decide close calls between
    tokens (``privateAddress`` against ``publicPort``) by whichever records came last. The average
    over the last ``1 / (1 - decay)`` steps or so is the weights the run was near, not the last
    jump.

    The average starts from the weights of the first optimizer step, and its state is saved in
    checkpoints, so a resumed run continues the same average.

    Args:
        decay: Weight of the old average at each step, in [0, 1). 0 keeps the live weights.

    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] | None = None
        self._last_step = 0  # Trainer.global_step counts optimizer steps taken

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the weights into the average once per optimizer step (not per accumulated batch)."""
        if trainer.global_step == self._last_step:  # an accumulating batch: the weights did not move
            return
        self._last_step = trainer.global_step
        with torch.no_grad():
            for name, param in _trainable(pl_module):
                average = self.shadow.get(name)
                if average is None:
                    self.shadow[name] = param.detach().clone()
                else:
                    average.lerp_(param.detach(), 1.0 - self.decay)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the averaged weights (once there is an average)."""
        if self.shadow and not trainer.sanity_checking:
            self._live = self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the live weights back for training."""
        if self._live is not None:
            self._copy_into(pl_module, self._live)
            self._live = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """End on the average: the module saves its final adapter after this hook."""
        if self.shadow:
            self._copy_into(pl_module, self.shadow)  # the live weights are not needed again

    def state_dict(self) -> dict[str, Any]:
        """The average and the last step folded into it."""
        return {"shadow": {name: t.clone() for name, t in self.shadow.items()}, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue a saved average."""
        self.shadow = dict(state_dict["shadow"])
        self._last_step = state_dict["last_step"]

    def _swap_in(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        live = {name: param.detach().clone() for name, param in _trainable(pl_module)}
        self._copy_into(pl_module, self.shadow)
        return live

    @staticmethod
    def _copy_into(pl_module: L.LightningModule, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in _trainable(pl_module):
                param.copy_(values[name].to(param.device))


def _trainable(pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in pl_module.named_parameters() if param.requires_grad]
