"""``merge``: fold a LoRA adapter into its base and save a standalone model (no PEFT needed)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qod_lightning.commands.common import CommandError, run


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning merge",
        description="Merge a LoRA adapter into its base model and save it as a plain Hugging Face model.",
    )
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json)")
    parser.add_argument("--output", required=True, help="directory for the merged model (replaced if present)")
    parser.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="the adapter was trained on a 4-bit (QLoRA) base: merge into the dequantized 4-bit weights",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    return parser


def merge_adapter(adapter: str | Path, output: str | Path, four_bit: bool = False, dtype: str = "float32") -> Path:
    """Load base + adapter, merge the LoRA update into the weights, and save model and tokenizer.

    The adapter's saved prompt format (:data:`~qod_lightning.model.PROMPT_FILE`) goes with them.

    A QLoRA adapter learned its update against the 4-bit weights, not the original ones, so with
    ``four_bit`` the base is loaded in 4-bit exactly as in training and then dequantized to
    ``dtype``: the merged model computes what the adapter model computed. Merging into the 4-bit
    weights themselves would re-quantize the update away.

    Args:
        adapter: The adapter directory (its tokenizer is saved with the model when present).
        output: Target directory, written atomically.
        four_bit: The adapter was trained on a 4-bit base.
        dtype: Dtype of the merged weights.

    Returns:
        The output directory.

    """
    from peft import PeftConfig, PeftModel

    from qod_lightning.artifacts import atomic_directory
    from qod_lightning.model import PROMPT_FILE, ModelSettings, QuantizationSettings, load_base_model, load_tokenizer

    base_name = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    quantization = QuantizationSettings(load_in_4bit=four_bit, compute_dtype=dtype)
    base = load_base_model(ModelSettings(base_name, dtype=dtype, quantization=quantization))
    if four_bit:
        base = base.dequantize()
        print(f"adapter trained on a 4-bit base: dequantized {base_name} to {dtype} before merging")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base_name)
    prompt_file = Path(adapter) / PROMPT_FILE
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if prompt_file.is_file():  # the merged model answers in the adapter's prompt format
            shutil.copyfile(prompt_file, Path(tmp) / PROMPT_FILE)
    return Path(output)


def _merge(args: argparse.Namespace) -> int:
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise CommandError(f"not a PEFT adapter directory (no adapter_config.json): {args.adapter}")
    print(f"merged model written to {merge_adapter(args.adapter, args.output, args.four_bit, args.dtype)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``merge``.

    Args:
        argv: Arguments after the command name.

    Returns:
        The exit status.

    """
    return run(build_parser(), _merge, argv)
