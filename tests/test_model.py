"""Model factory: target modules per architecture, exact LoRA sizes, 4-bit loading, loading for inference."""

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from qod_lightning.model import (
    PROMPT_FILE,
    LoRASettings,
    ModelSettings,
    QuantizationSettings,
    build_model,
    count_parameters,
    load_for_inference,
    lora_config,
    resolve_prompt_format,
    resolve_target_modules,
    saved_prompt_format,
)

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def test_phi3_mini_adapter_has_design_size():
    config = Phi3Config()  # the defaults are Phi-3-mini-4k's shape
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552
    peft_model = get_peft_model(model, lora_config(model, LoRASettings()))
    trainable, total = count_parameters(peft_model)
    assert trainable == 25_165_824
    assert total == 3_821_079_552 + 25_165_824


def test_phi3_uses_fused_names_and_rejects_split_ones():
    config = Phi3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,
    )
    model = Phi3ForCausalLM(config)
    assert resolve_target_modules(model, "all-projections") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer"):
        resolve_target_modules(model, ["q_proj", "o_proj"])


def test_llama_uses_split_names():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,
    )
    model = LlamaForCausalLM(config)
    assert resolve_target_modules(model, "all-projections") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert resolve_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_settings_are_checked():
    with pytest.raises(ValueError):
        LoRASettings(r=0)
    with pytest.raises(ValueError):
        QuantizationSettings(quant_type="int3")
    with pytest.raises(ValueError):
        ModelSettings(dtype="float8")


def test_only_lora_parameters_train(tiny_model_dir):
    model = build_model(ModelSettings(model_name_or_path=str(tiny_model_dir)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)


def test_4bit_nf4_loads_and_runs_on_cpu(tiny_model_dir):
    settings = ModelSettings(
        model_name_or_path=str(tiny_model_dir),
        quantization=QuantizationSettings(load_in_4bit=True, compute_dtype="float32"),
    )
    model = build_model(settings)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    out = model(input_ids=torch.tensor([[0, 5, 6, 7]]))
    assert torch.isfinite(out.logits).all()
    trainable, _ = count_parameters(model)
    assert trainable > 0


def test_4bit_layers_stay_on_the_portable_path_after_an_inference_forward(tiny_model_dir):
    # bitsandbytes would repack them for its bf16 kernel here on an AVX512-BF16 CPU.
    settings = ModelSettings(str(tiny_model_dir), quantization=QuantizationSettings(True, compute_dtype="float32"))
    model = build_model(settings).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad():
        model(input_ids=torch.tensor([[0, 5, 6, 7]]))
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_the_hub_kernel_warning_of_bitsandbytes_is_kept_out_of_the_output():
    import logging

    import qod_lightning  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    dropped = logger.makeRecord(
        logger.name,
        logging.WARNING,
        "",
        0,
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s",
        ("x",),
        None,
    )
    kept = logger.makeRecord(logger.name, logging.WARNING, "", 0, "another warning", (), None)
    assert not logger.filter(dropped) and logger.filter(kept)


def test_4bit_storage_dtype_can_match_the_other_weights_for_fsdp(tiny_model_dir):
    import pytest

    settings = ModelSettings(
        model_name_or_path=str(tiny_model_dir),
        quantization=QuantizationSettings(load_in_4bit=True, compute_dtype="float32", quant_storage="float32"),
    )
    model = build_model(settings)
    packed = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert packed and {w.dtype for w in packed} == {torch.float32}
    out = model(input_ids=torch.tensor([[0, 5, 6, 7]]))
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="quant_storage"):
        QuantizationSettings(quant_storage="int4")


def test_4bit_weights_count_unpacked_whatever_their_storage(tiny_model_dir):
    def total(**quantization):
        settings = ModelSettings(
            str(tiny_model_dir), quantization=QuantizationSettings(compute_dtype="float32", **quantization)
        )
        return count_parameters(build_model(settings))

    full = total(load_in_4bit=False)
    assert total(load_in_4bit=True) == full  # two values per uint8
    assert total(load_in_4bit=True, quant_storage="float32") == full  # eight per float32


def test_load_for_inference_returns_an_eval_model(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir))
    assert not model.training
    assert tokenizer.eos_token_id is not None


def test_load_for_inference_rejects_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory nor a loadable model"):
        load_for_inference(str(tmp_path / "nowhere"))


def test_the_saved_prompt_format_is_the_default_and_can_be_overridden(tmp_path, caplog):
    import logging

    assert resolve_prompt_format(tmp_path, None) == "alpaca"  # nothing saved
    assert resolve_prompt_format("embedded:smollm2-135m", "chat") == "chat"
    (tmp_path / PROMPT_FILE).write_text('{"prompt_format": "chat"}')
    assert saved_prompt_format(tmp_path) == "chat"
    assert resolve_prompt_format(tmp_path, None) == "chat"
    with caplog.at_level(logging.WARNING):
        assert resolve_prompt_format(tmp_path, "alpaca") == "alpaca"
    assert "trained on chat prompts; generating with alpaca prompts as asked" in caplog.text
    for bad in ('{"prompt_format": "xml"}', "[1]", "{"):
        (tmp_path / PROMPT_FILE).write_text(bad)
        with pytest.raises(ValueError, match=PROMPT_FILE):
            saved_prompt_format(tmp_path)
