"""Average saved full fine-tuned models into one (a uniform model soup), e.g. two snapshots of a run.

    python scripts/average_models.py --out OUT_DIR MODEL_DIR MODEL_DIR [...]

What :class:`~qod_lightning.callbacks.TailAverage` does during training, done afterwards on model
directories that ``save_adapter`` wrote (``Snapshots`` included): every tensor of
``model.safetensors`` is averaged in float64 and stored in its own dtype; the other files
(config, tokenizer, prompt format) are copied from the first directory. The models must share
their architecture and tensor names; adapters (LoRA) are refused.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from qod_lightning.artifacts import COMPLETE_MARKER, atomic_directory


def average_models(models: list[Path], out: Path) -> Path:
    """Write the mean of ``models``' weights to ``out`` (a model directory like each of them).

    Args:
        models: Two or more directories, each with a ``model.safetensors``.
        out: The new model directory, written whole or not at all (an existing one is replaced).

    Returns:
        ``out``.

    Raises:
        ValueError: Fewer than two models, an adapter directory, or tensors that do not match.
    """
    if len(models) < 2:
        raise ValueError("averaging needs at least two models")
    for model in models:
        if not (model / "model.safetensors").is_file():
            raise ValueError(f"{model}: no model.safetensors (an adapter directory cannot be averaged here)")
    states = [load_file(model / "model.safetensors") for model in models]
    for model, state in zip(models[1:], states[1:], strict=True):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise ValueError(f"{model}: its tensors do not match those of {models[0]}")
    mean = {
        name: (sum(state[name].double() for state in states) / len(states)).to(states[0][name].dtype)
        for name in states[0]
    }
    with atomic_directory(out) as tmp:
        for source in models[0].iterdir():
            if source.is_file() and source.name not in ("model.safetensors", COMPLETE_MARKER):
                shutil.copy2(source, tmp / source.name)
        save_file(mean, tmp / "model.safetensors", metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out OUT MODEL MODEL [...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model directories (model.safetensors each)")
    parser.add_argument("--out", required=True, type=Path, help="new model directory")
    args = parser.parse_args(argv)
    print(f"wrote {average_models(args.models, args.out)}")


if __name__ == "__main__":
    main()
