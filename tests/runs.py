"""Build stage configs for the tiny model and run ``python -m qod_lightning fit`` in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DATA_MODULES = {
    "sft": "qod_lightning.data.sft.SFTDataModule",
    "dpo": "qod_lightning.data.preference.PreferenceDataModule",
}


def stage_config(
    stage: str,
    tiny_model_dir: Path,
    data: Path,
    root: Path,
    kill_at: int | None,
    dropout: float = 0.1,
    batch_size: int = 1,
    sft_adapter: Path | None = None,
    **trainer: object,
) -> Path:
    """Write ``root/config.yaml``: 2 epochs, accumulation 2, a checkpoint after every optimizer step.

    ``kill_at`` adds a SIGKILL at that micro-batch; ``trainer`` overrides Trainer settings; DPO
    starts from ``sft_adapter``.
    """
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(root / "checkpoints"),
                "save_last": True,
                "save_top_k": 0,
                "every_n_train_steps": 1,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.faults.KillAtBatch", "init_args": {"batch": kill_at}})
    callbacks.append({"class_path": "tests.faults.DumpMetrics", "init_args": {"directory": str(root / "metrics")}})
    model = {
        "model_name_or_path": str(tiny_model_dir),
        "dtype": "float32",
        "lora": {"r": 4, "alpha": 8, "dropout": dropout},
    }
    init_args = {"model": model, "output_dir": str(root / "out")}
    if stage == "dpo":
        model["adapter_path"] = str(sft_adapter)
        init_args["beta"] = 0.1
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": 2,
            "accumulate_grad_batches": 2,
            "precision": "32",
            "deterministic": True,
            "use_distributed_sampler": False,
            "enable_progress_bar": False,
            "logger": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            "callbacks": callbacks,
            **trainer,
        },
        "model": {
            "class_path": f"qod_lightning.modules.{stage.upper()}Module",
            "init_args": {
                **init_args,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-3}},
                "scheduler": {
                    "class_path": "qod_lightning.modules.common.LinearWarmupDecay",
                    "init_args": {"warmup_ratio": 0.2},
                },
            },
        },
        "data": {
            "class_path": DATA_MODULES[stage],
            "init_args": {"train_file": str(data), "val_fraction": 0.17, "batch_size": batch_size, "max_length": 256},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qod_lightning", "fit", "--config", str(config), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "out" / "final" / "adapter_model.safetensors")
