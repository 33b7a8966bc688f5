"""A single-device strategy that leaves the model on its device when ``fit`` ends.

Lightning's ``Strategy.teardown`` moves the LightningModule and the optimizer state back to the
CPU after every ``fit``, so that the GPU memory is free for whatever follows. For a 4-bit
Phi-3-mini that is a copy of about 3 GiB to host memory at the end of every stage, seconds of
wall time and gigabytes of host memory that nothing uses (measured in ``benchmarks/README.md``).
Nothing here uses the model on the CPU after ``fit``: the adapter is saved in ``on_fit_end``, and the
next stage loads its own model. The GPU memory is returned when the module is freed
(:func:`qod_lightning.model.free_gpu_memory`, which the pipeline calls between stages).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy


class KeepOnDeviceStrategy(SingleDeviceStrategy):
    """:class:`~lightning.pytorch.strategies.SingleDeviceStrategy` whose teardown moves nothing to the CPU.

    Use it from a config (``trainer.strategy.class_path: qod_lightning.strategy.KeepOnDeviceStrategy``)
    with ``devices: 1``; under DDP or FSDP use Lightning's own strategies.

    Args:
        device: The device to train on. ``None`` takes it from the trainer's accelerator (the
            current CUDA device, ``mps``, or the CPU), as ``strategy="auto"`` does, so one config
            serves a GPU machine and a CPU test.
        **kwargs: Passed to :class:`~lightning.pytorch.strategies.SingleDeviceStrategy`.
    """

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(device="cpu" if device is None else device, **kwargs)
        self._device_from_accelerator = device is None

    @property
    def root_device(self) -> torch.device:
        """The device given, or the accelerator's when none was."""
        if self._device_from_accelerator and isinstance(self.accelerator, CUDAAccelerator):
            return torch.device("cuda", torch.cuda.current_device())
        if self._device_from_accelerator and isinstance(self.accelerator, MPSAccelerator):
            return torch.device("mps", 0)
        return super().root_device

    def teardown(self) -> None:
        """Lightning's teardown (precision plugin, accelerator, checkpoint I/O) without the move to the CPU.

        ``Strategy.teardown`` moves what ``lightning_module`` and ``optimizers`` hold; both are
        hidden from it for the call and put back after, so the rest of its work still runs.
        """
        held = self._lightning_module, self._optimizers
        self._lightning_module, self._optimizers = None, []
        try:
            super().teardown()
        finally:
            self._lightning_module, self._optimizers = held


def check_one_device(strategy: object, devices: object, num_nodes: int = 1) -> None:
    """Refuse :class:`KeepOnDeviceStrategy` with more than one device, which it would silently ignore.

    Lightning gives a single-device strategy one device whatever ``devices`` says, so a config
    that names this strategy and a command line that adds ``--trainer.devices 4`` would train on
    one GPU of four without a word.

    Args:
        strategy: The trainer's ``strategy`` setting: a name, an instance, or a parsed
            ``class_path`` / ``init_args`` namespace.
        devices: The trainer's ``devices`` setting; ``1``, ``"1"`` and one device index (``[3]``,
            ``"3,"``) pass.
        num_nodes: The trainer's ``num_nodes`` setting.

    Raises:
        ValueError: When the strategy is :class:`KeepOnDeviceStrategy` and ``devices`` or
            ``num_nodes`` asks for more than one device.
    """
    class_path = getattr(strategy, "class_path", None) or type(strategy).__module__ + "." + type(strategy).__name__
    if not class_path.endswith("KeepOnDeviceStrategy"):
        return
    if isinstance(devices, str) and "," in devices:  # Lightning reads "0," as the list [0]
        devices = [index for index in devices.split(",") if index.strip()]
    one = devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if not one or num_nodes != 1:
        raise ValueError(
            f"KeepOnDeviceStrategy trains on one device, but devices={devices!r} and num_nodes={num_nodes}: "
            "for several, also pass --trainer.strategy ddp (or fsdp)"
        )
