"""Checks a training config's inputs before anything is built: model, starting adapter, data files.

Without them, a fresh clone's ``fit --config configs/dpo.yaml`` retries the hub for half a minute
and ends in a jsonargparse dump that names neither the missing SFT adapter nor the missing model.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from qod_lightning.commands.common import CommandError

EMBEDDED_RECIPE = "python -m qod_lightning pipeline --config configs/pipeline/embedded.yaml"
DATA_FILE_KEYS = ("train_file", "val_file", "test_file")


class SetupError(CommandError):
    """A config names an input that is not there; the message says what to run."""


def hub_offline() -> bool:
    """Whether the environment turns the Hugging Face hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    values = (os.environ.get(key, "").strip().lower() for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(value in ("1", "true", "yes", "on") for value in values)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` seconds."""
    if hub_offline():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with no other path parts, as the hub spells a repository."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def model_problem(name: str) -> str | None:
    """Why the model ``name`` cannot be loaded here, or ``None`` when it can.

    Args:
        name: ``embedded:NAME`` (converted locally), a local directory, or a hub id.

    Returns:
        A message with what to run, or ``None``.

    """
    if name.startswith("embedded:") or Path(name).is_dir():
        return None
    if not looks_like_hub_id(name):
        return f"model {name!r} is no local directory (and no hub id)"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str) or hub_reachable():
        return None
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached"
    return (
        f"model {name} is not in the local Hugging Face cache and {why}: download it where the hub is "
        f"reachable (`hf download {name}`) and copy the cache here, or run the embedded "
        f"recipe, which needs no hub: {EMBEDDED_RECIPE}"
    )


def adapter_problem(path: str, config_file: str | None) -> str | None:
    """Why the starting adapter (or fully fine-tuned model) ``path`` is missing, or ``None`` when it is there."""
    if (Path(path) / "adapter_config.json").is_file() or (Path(path) / "config.json").is_file():
        return None
    if looks_like_hub_id(path) and not Path(path).exists():
        return model_problem(path)
    return f"the starting adapter {path} does not exist (no adapter_config.json): {_sft_hint(config_file)}"


def _sft_hint(config_file: str | None) -> str:
    """What to run to make the SFT adapter a DPO config starts from."""
    command = "an SFT config (`python -m qod_lightning fit --config configs/sft.yaml`)"
    if config_file:
        sibling = Path(config_file).with_name(Path(config_file).name.replace("dpo", "sft"))
        if sibling != Path(config_file) and sibling.is_file():
            command = f"`python -m qod_lightning fit --config {sibling}`"
    return f"DPO starts from the SFT adapter; train it first with {command}"


def data_problems(data_args: dict) -> list[str]:
    """The data files a data module's ``init_args`` name that do not exist."""
    problems = []
    for key in DATA_FILE_KEYS:
        path = data_args.get(key)
        if path and not Path(path).is_file():
            problems.append(
                f"data.{key}: {path} does not exist (paths are relative to {Path.cwd()}; "
                "`python -m qod_lightning data generate --help` writes the datasets)"
            )
    return problems


def check_training_inputs(model_args: dict, data_args: dict, config_file: str | None = None) -> None:
    """Raise :class:`SetupError` listing every missing input of a training config.

    Args:
        model_args: The :class:`~qod_lightning.model.ModelSettings` fields (``model_name_or_path``,
            ``adapter_path``).
        data_args: The data module's ``init_args``.
        config_file: The config's path, to name the SFT config that makes a missing adapter.

    Raises:
        SetupError: When the model, the starting adapter or a data file is missing.

    """
    problems = [p for p in (model_problem(str(model_args.get("model_name_or_path", ""))),) if p]
    if model_args.get("adapter_path"):
        adapter = adapter_problem(str(model_args["adapter_path"]), config_file)
        if adapter and adapter not in problems:
            problems.append(adapter)
    problems += data_problems(data_args)
    if problems:
        raise SetupError("; ".join(problems) if len(problems) == 1 else "\n  - ".join(["cannot start:", *problems]))
