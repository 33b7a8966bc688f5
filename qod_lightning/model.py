"""Model factory: a causal LM, optionally 4-bit NF4 (QLoRA), wrapped with a PEFT LoRA adapter.

Also the counterpart of :func:`save_adapter`: :func:`load_for_inference` loads a trained adapter
or model for generation.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qod_lightning.dropout import use_byte_dropout

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FINETUNE_MODES = ("lora", "full")

KNOWN_PROJECTIONS: dict[str, tuple[str, ...]] = {
    # Hugging Face's Phi-3 fuses q/k/v and gate/up: `q_proj` matches nothing there.
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""Every attention and MLP projection, per architecture (``config.model_type``)."""


@dataclass
class LoRASettings:
    """The LoRA adapter (defaults: the design's recipe).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scale numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter's input.
        target_modules: Module names to adapt, or ``"all-projections"`` for every attention and
            MLP projection of the architecture (fused names on Phi-3, split ones on Llama).
        byte_dropout: Draw the dropout masks from random bytes (:mod:`qod_lightning.dropout`):
            ``dropout`` rounded to a multiple of 1/256, a cheaper mask on CPU. Also applies to an
            adapter loaded from ``adapter_path``, with that adapter's dropout.

    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-projections"
    byte_dropout: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid LoRA settings: r={self.r}, alpha={self.alpha}, dropout={self.dropout}")


@dataclass
class QuantizationSettings:
    """4-bit loading through bitsandbytes (QLoRA).

    Attributes:
        load_in_4bit: Quantize the base model's linear layers to 4 bits.
        quant_type: ``nf4`` (NormalFloat, the QLoRA paper's) or ``fp4``.
        double_quant: Quantize the quantization constants too (about 0.4 bit/param saved).
        compute_dtype: Dtype the 4-bit matmuls compute in.
        quant_storage: Dtype the packed 4-bit values are stored in. ``uint8`` by default; FSDP
            shards a model only when every parameter has one dtype, so set it to the dtype of the
            other weights (``bfloat16``) for FSDP.

    """

    load_in_4bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        if self.quant_storage not in (*DTYPES, "uint8"):
            raise ValueError(f"quant_storage must be uint8 or one of {sorted(DTYPES)}, got {self.quant_storage!r}")


@dataclass
class ModelSettings:
    """Which model to load and how.

    Attributes:
        model_name_or_path: Hub id, local Hugging Face directory, or ``embedded:smollm2-135m``.
        adapter_path: The SFT output to start from (e.g. for DPO): a saved PEFT adapter, or with
            ``finetune: full`` a saved whole model, loaded in place of ``model_name_or_path``.
        finetune: ``lora`` (train a LoRA adapter, the base frozen; QLoRA with 4-bit loading) or
            ``full`` (train every weight; for small models such as the embedded 135M one).
        dtype: Dtype of the non-quantized weights.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Run code shipped with a hub model; off unless a config turns it on.
        lora: The adapter.
        quantization: 4-bit loading.

    """

    model_name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"
    adapter_path: str | None = None
    finetune: str = "lora"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoRASettings = field(default_factory=LoRASettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.finetune == "full" and self.quantization.load_in_4bit:
            raise ValueError("finetune: full trains every weight, and 4-bit weights cannot be trained; use lora")


def resolve_model_path(name: str) -> str:
    """Turn ``embedded:NAME`` into a prepared local directory; pass anything else through."""
    if name.startswith("embedded:"):
        from qod_lightning.embedded import prepare_embedded

        return str(prepare_embedded(name.removeprefix("embedded:")))
    return name


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer, giving it a pad token (EOS) when it has none.

    Args:
        name_or_path: As :attr:`ModelSettings.model_name_or_path`.
        trust_remote_code: See :class:`ModelSettings`.

    Returns:
        The tokenizer.

    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names of the linear layers inside the transformer blocks (``lm_head`` excluded)."""
    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and "lm_head" not in full_name and not full_name.endswith("score"):
            names.add(full_name.rsplit(".", 1)[-1])
    return names


def resolve_target_modules(model: nn.Module, requested: str | list[str]) -> list[str]:
    """Turn a target-module setting into module names that exist in ``model``.

    Args:
        model: The base model.
        requested: ``"all-projections"`` or explicit names.

    Returns:
        The sorted names.

    Raises:
        ValueError: When a requested name matches no module (for example ``q_proj`` on Phi-3,
            whose attention projection is the fused ``qkv_proj``).

    """
    available = linear_module_names(model)
    if requested == "all-projections":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        known = KNOWN_PROJECTIONS.get(model_type) if model_type else None
        names = [n for n in known if n in available] if known else sorted(available)
        if not names:
            raise ValueError(f"no projection modules found in {type(model).__name__}")
        return sorted(names)
    requested = [requested] if isinstance(requested, str) else list(requested)
    missing = [n for n in requested if n not in available]
    if missing:
        raise ValueError(
            f"LoRA target module(s) {missing} match no linear layer of {type(model).__name__}; "
            f"available: {sorted(available)}"
        )
    return sorted(requested)


def load_base_model(settings: ModelSettings) -> PreTrainedModel:
    """Load the causal LM described by ``settings`` (4-bit when configured), without an adapter."""
    path = resolve_model_path(settings.model_name_or_path)
    kwargs: dict = {
        "dtype": DTYPES[settings.dtype],
        "attn_implementation": settings.attn_implementation,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.quantization.load_in_4bit:
        from transformers import BitsAndBytesConfig

        q = settings.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
            bnb_4bit_quant_storage=DTYPES.get(q.quant_storage, torch.uint8),
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if settings.quantization.load_in_4bit:
        use_portable_4bit_kernels(model)
    return model


def use_portable_4bit_kernels(model: nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on the dequantize-then-matmul path on every CPU.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weights on its first
    forward in eval mode without grad and from then on multiplies in bfloat16, whatever the
    configured compute dtype. Evaluation, DPO's reference log-probs and a merged model would then
    differ from training's numbers, and from the same run on a CPU without those units (a logit
    difference of about 3e-3 on the test model, against 0 on the portable path).

    Args:
        model: A model whose 4-bit layers to set.

    Returns:
        How many layers were set.

    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def lora_config(model: nn.Module, lora: LoRASettings) -> LoraConfig:
    """The PEFT config for ``model`` with target modules resolved and checked."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=resolve_target_modules(model, lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(settings: ModelSettings, trainable: bool = True) -> PeftModel | PreTrainedModel:
    """Load the model to train: the base with a LoRA adapter, or with ``finetune: full`` the whole model.

    Args:
        settings: What to load.
        trainable: Whether the trained parameters require grad (the adapter's; with
            ``finetune: full`` every weight). Base weights under an adapter never do.

    Returns:
        The PEFT-wrapped model, or the plain model with ``finetune: full``.

    """
    if settings.finetune == "full":
        return _build_full(settings, trainable)
    model = load_base_model(settings)
    if settings.quantization.load_in_4bit:
        # Casts norms to fp32 and enables input grads so checkpointing works through 4-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if settings.adapter_path:
        peft_model = PeftModel.from_pretrained(model, settings.adapter_path, is_trainable=trainable)
    else:
        peft_model = get_peft_model(model, lora_config(model, settings.lora))
    # Record the name the user gave (e.g. ``embedded:smollm2-135m``), not a resolved cache path,
    # so a saved adapter finds its base on any machine.
    peft_model.peft_config["default"].base_model_name_or_path = settings.model_name_or_path
    if settings.lora.byte_dropout:
        use_byte_dropout(peft_model)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(trainable and "lora_" in name)
    return peft_model


def _build_full(settings: ModelSettings, trainable: bool) -> PreTrainedModel:
    """The whole model, from ``adapter_path`` when given (a fully fine-tuned SFT output), every weight trained."""
    source = settings.adapter_path or settings.model_name_or_path
    model = load_base_model(replace(settings, model_name_or_path=source, adapter_path=None))
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(trainable)
    return model


def load_for_inference(
    path: str, load_in_4bit: bool = False, dtype: str = "float32"
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load a model for generation, in eval mode (on the GPU when there is one).

    An adapter over full-precision weights is merged into them in memory.

    Args:
        path: A PEFT adapter directory (``adapter_config.json``; its base is loaded from the
            config's ``base_model_name_or_path``, which may be ``embedded:NAME``; the tokenizer is
            the one saved beside the adapter), or a plain/merged Hugging Face model directory,
            hub id or ``embedded:NAME``.
        load_in_4bit: Load the base weights in 4-bit NF4, as QLoRA trained them.
        dtype: Dtype of the non-quantized weights (also the 4-bit compute dtype).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: When ``path`` is neither an adapter nor a loadable model.

    """
    quantization = QuantizationSettings(load_in_4bit=load_in_4bit, compute_dtype=dtype)
    adapter_dir = Path(path)
    if (adapter_dir / "adapter_config.json").is_file():
        base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
        base = load_base_model(ModelSettings(base_name, dtype=dtype, quantization=quantization))
        model = PeftModel.from_pretrained(base, path, is_trainable=False)
        if not load_in_4bit:
            # Fold W + BA into W: the same logits without seven extra matmul pairs per layer
            # (faster greedy decoding, same tokens). 4-bit weights keep the adapter:
            # merging would dequantize them.
            model = model.merge_and_unload()
        has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(path if has_tokenizer else base_name)
    else:
        try:
            model = load_base_model(ModelSettings(path, dtype=dtype, quantization=quantization))
        except OSError as err:
            raise FileNotFoundError(f"{path}: not a PEFT adapter directory nor a loadable model ({err})") from err
        tokenizer = load_tokenizer(path)
    if torch.cuda.is_available() and not load_in_4bit:
        model.to("cuda")  # 4-bit weights are placed on the GPU by bitsandbytes when they load
    model.eval()
    return model, tokenizer


def causal_lm(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """The causal LM itself: under the PEFT wrapper, or the model when it has none."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (4-bit weights counted unpacked)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()  # 4-bit values packed into uint8 (2 each) or, for FSDP, bf16 (4 each)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


PROMPT_FILE = "qod_prompt.json"
"""Written beside a trained adapter (and copied into a merged model): the prompt format it learned."""


def save_adapter(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    prompt_format: str | None = None,
    answer_notes: bool = False,
) -> Path:
    """Write the adapter (``adapter_config.json`` + safetensors) and the tokenizer, atomically.

    A fully fine-tuned model (no PEFT wrapper) is written whole instead (``config.json`` +
    safetensors): a plain Hugging Face model directory, as ``merge`` writes.

    Files go to a sibling temporary directory first, which is renamed into place, so a crash
    never leaves a half-written adapter that a later run would trust.

    Args:
        model: The PEFT model, or the fully fine-tuned model.
        tokenizer: Saved beside the adapter so the directory is self-contained.
        directory: Target directory (replaced if it exists).
        prompt_format: The prompt format the adapter was trained on, saved in :data:`PROMPT_FILE`
            so inference uses it by default (:func:`resolve_prompt_format`).
        answer_notes: The training answers opened with a scratchpad note; saved in
            :data:`PROMPT_FILE` too, so constrained decoding lets the model write one
            (:func:`saved_answer_notes`).

    Returns:
        The directory.

    """
    from qod_lightning.artifacts import atomic_directory

    with atomic_directory(directory) as tmp:
        if isinstance(model, PeftModel):
            # LoRA never touches the embeddings; saying so stops PEFT from looking up the base's
            # config by name (which fails for ``embedded:`` names and hub ids offline).
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if prompt_format is not None:
            saved = {"prompt_format": prompt_format, **({"answer_notes": True} if answer_notes else {})}
            (Path(tmp) / PROMPT_FILE).write_text(json.dumps(saved) + "\n", encoding="utf-8")
    return Path(directory)


def saved_prompt_format(model: str | Path) -> str | None:
    """The prompt format saved with a trained adapter or merged model, or ``None`` when there is none.

    Raises:
        ValueError: When the file exists but does not name a format.
    """
    path = Path(model) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("prompt_format")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object with a prompt_format: {err}") from err
    if value not in ("alpaca", "chat"):
        raise ValueError(f"{path}: unknown prompt_format {value!r} (alpaca or chat)")
    return value


def saved_answer_notes(model: str | Path) -> bool:
    """Whether a trained adapter or model learned answers that open with a scratchpad note."""
    path = Path(model) / PROMPT_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("answer_notes") is True
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object: {err}") from err


def resolve_prompt_format(model: str | Path, requested: str | None) -> str:
    """The prompt format to generate with: the one asked for, else the model's own, else ``alpaca``.

    A model answers well only in the format it was trained on, so asking for another one is
    allowed but warned about.

    Args:
        model: Adapter or model directory (or a name with no directory: nothing saved).
        requested: The format asked for, or ``None`` for the model's own.

    Returns:
        ``alpaca`` or ``chat``.

    """
    saved = saved_prompt_format(model)
    if requested is None:
        return saved or "alpaca"
    if saved is not None and requested != saved:
        log.warning("%s was trained on %s prompts; generating with %s prompts as asked", model, saved, requested)
    return requested


def free_gpu_memory() -> None:
    """Free the models that were dropped, and return the GPU memory they held to the driver.

    A Lightning trainer and its module refer to each other, so a finished stage's model is freed
    only by the cycle collector, not when the last name for it goes. ``gc.collect`` runs that
    collector now, before the next stage loads its own model beside it.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
