"""Benchmark harness: our SFT/DPO against TRL's, and inference speed (``python -m qod_lightning bench``).

Each training stage (framework x SFT/DPO) runs in a fresh spawned process on the same model, the same
token ids in the same order, the same batch size, precision, LoRA config, optimizer and number of
optimizer steps, after the same warm-up.

Modules: :mod:`~qod_lightning.bench.options` (the command's options, each run's settings),
:mod:`~qod_lightning.bench.data` (records, order, token counts), :mod:`~qod_lightning.bench.model`
(load settings, the start adapter), :mod:`~qod_lightning.bench.timing` (warm-up, stage clock, result
record), :mod:`~qod_lightning.bench.memory` (RSS probes), :mod:`~qod_lightning.bench.ours` (our
Lightning modules), :mod:`~qod_lightning.bench.trl_runner` (TRL's trainers),
:mod:`~qod_lightning.bench.inference` (generation and constrained decoding),
:mod:`~qod_lightning.bench.gpu` (the GPU, MFU), :mod:`~qod_lightning.bench.report` (tables, targets,
JSON) and :mod:`~qod_lightning.bench.runner` (orchestration).
"""
