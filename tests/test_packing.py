"""Packed preference pairs (prompt once, then both answers) score exactly like two separate rows."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from qod_lightning.data.packing import pack_pair, pack_pairs
from qod_lightning.data.tokenize import pad_batch
from qod_lightning.logprobs import (
    CHOSEN,
    IGNORE_INDEX,
    PAD,
    PROMPT,
    REJECTED,
    PairLayout,
    can_pack,
    pair_attention_mask,
    pair_layout,
    pair_logps,
    sequence_logps,
)

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)

VOCAB = 61
# float64 models, yet not 1e-12: transformers computes the rotary angles' cos/sin in float32, and the
# vectorised cos can differ by one float32 ulp depending on where a position sits in the tensor.
# A masking or position mistake shows up as an O(1) difference.
TOL = {"rtol": 1e-6, "atol": 1e-7}


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to float32 rounding of the largest gradient entry (the rotary noise above)."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * float(w.abs().max()))


def test_pack_pair_layout():
    row = pack_pair([5, 6, 7], [8, 9], [10, 11, 12])
    assert row["ids"] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert row["positions"] == [0, 1, 2, 3, 4, 3, 4, 5]
    assert row["segments"] == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3
    assert row["targets"] == [IGNORE_INDEX] * 3 + [8, 9, 10, 11, 12]
    # 8 is predicted at 7 (index 2), 9 at 8; 10 at 7 again (the prompt's end), 11 at 10, 12 at 11
    assert row["sources"] == [0, 0, 0, 2, 3, 2, 5, 6]


def test_pack_pair_refuses_empty_parts():
    with pytest.raises(ValueError, match="non-empty"):
        pack_pair([1], [], [2])


def test_mask_shows_each_token_exactly_its_own_rows_prefix():
    items = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]},
        {"prompt_ids": [9], "chosen_ids": [10], "rejected_ids": [11]},
    ]
    batch = pack_pairs(items, pad_token_id=0)
    mask = pair_attention_mask(batch["packed_segments"])[:, 0]  # (B, L, L)
    for b, item in enumerate(items):
        prompt = item["prompt_ids"]
        own_rows = {CHOSEN: prompt + item["chosen_ids"], REJECTED: prompt + item["rejected_ids"]}
        segments = batch["packed_segments"][b].tolist()
        for q, segment in enumerate(segments):
            keys = mask[b, q].nonzero()[:, 0]
            seen = [(batch["packed_positions"][b, k].item(), batch["packed_ids"][b, k].item()) for k in keys]
            if segment == PAD:
                assert seen == [(0, 0)]  # itself only
                continue
            position = batch["packed_positions"][b, q].item()
            row = own_rows[segment] if segment != PROMPT else prompt
            assert seen == list(enumerate(row[: position + 1]))


def test_additive_mask_matches_boolean():
    segments = pack_pairs([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}], 0)["packed_segments"]
    boolean = pair_attention_mask(segments)
    additive = pair_attention_mask(segments, torch.float64)
    assert torch.equal(additive == 0, boolean)
    assert (additive[~boolean] == torch.finfo(torch.float64).min).all()


def _model(arch: str, attn: str, sliding_window: int | None = None):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(num_key_value_heads=2, **common)  # grouped-query attention
        model = LlamaForCausalLM(config)
    else:
        config = Phi3Config(num_key_value_heads=4, sliding_window=sliding_window, **common)
        model = Phi3ForCausalLM(config)
    model.config._attn_implementation = attn
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if arch == "llama" else ["qkv_proj", "o_proj", "down_proj"]
    # init_lora_weights=False: B is random too, so the adapter changes the outputs and gets gradients
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model.double(), lora)


def _pairs(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [(5, 3, 6), (2, 7, 1), (9, 1, 4)]  # prompts, chosen and rejected of different lengths

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in lengths]


def _batch(items, multiple: int = 1):
    rows = [
        {"input_ids": item["prompt_ids"] + item[key], "labels": [IGNORE_INDEX] * len(item["prompt_ids"]) + item[key]}
        for key in ("chosen_ids", "rejected_ids")
        for item in items
    ]
    return pad_batch(rows, 0, pad_to_multiple_of=multiple) | pack_pairs(items, 0, multiple)


def _one_row_at_a_time(model, items) -> torch.Tensor:
    """Independent reference: every answer alone in its own unpadded row, full logits."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for item in items:
            ids = torch.tensor([item["prompt_ids"] + item[key]])
            labels = torch.tensor([[IGNORE_INDEX] * len(item["prompt_ids"]) + item[key]])
            out.append(sequence_logps(model(input_ids=ids).logits, labels)[0])
    return torch.cat(out)


def _lora_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return grads


@pytest.mark.parametrize(("arch", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("phi3", "sdpa"), ("phi3", "eager")])
def test_packed_rows_equal_one_row_per_answer(arch, attn):
    model = _model(arch, attn)
    items = _pairs()
    batch = _batch(items)
    assert can_pack(model, batch)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=torch.float64)  # any loss of the six

    expected = _one_row_at_a_time(model, items)
    (weights * expected).sum().backward()
    expected_grads = _lora_grads(model)

    packed = pair_logps(model, batch, share_prompt=True)
    (weights * packed).sum().backward()
    packed_grads = _lora_grads(model)

    two_rows = pair_logps(model, batch, share_prompt=False)

    torch.testing.assert_close(packed, expected, **TOL)
    torch.testing.assert_close(two_rows, expected, **TOL)
    assert_grads_close(packed_grads, expected_grads)


def test_padding_to_a_multiple_changes_shapes_not_log_probs():
    model = _model("phi3", "sdpa")
    items = _pairs(seed=2)
    plain, padded = _batch(items), _batch(items, multiple=16)
    assert plain["packed_ids"].shape[1] == 14 and padded["packed_ids"].shape[1] == 16
    assert plain["input_ids"].shape[1] == 13 and padded["input_ids"].shape[1] == 16
    assert padded["attention_mask"][:, 13:].sum() == 0
    for share_prompt in (True, False):
        torch.testing.assert_close(
            pair_logps(model, padded, share_prompt), pair_logps(model, plain, share_prompt), **TOL
        )
    with pytest.raises(ValueError, match="at least 1"):
        pack_pairs(items, 0, pad_to_multiple_of=0)


def test_packed_rows_with_gradient_checkpointing():
    model = _model("llama", "sdpa")
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    items = _pairs(seed=1)
    expected = _one_row_at_a_time(model, items)
    expected.sum().backward()
    expected_grads = _lora_grads(model)
    packed = pair_logps(model, _batch(items))
    packed.sum().backward()
    torch.testing.assert_close(packed, expected, **TOL)
    assert_grads_close(_lora_grads(model), expected_grads)


def test_falls_back_to_two_rows_where_packing_would_differ():
    items = _pairs()
    batch = _batch(items)
    longest_position = int(batch["packed_positions"].max())
    # a sliding window the longest answer reaches past: the packed mask has no window
    narrow = _model("phi3", "sdpa", sliding_window=longest_position)
    assert not can_pack(narrow, batch)
    torch.testing.assert_close(pair_logps(narrow, batch), _one_row_at_a_time(narrow, items), **TOL)
    assert can_pack(_model("phi3", "sdpa", sliding_window=longest_position + 2), batch)

    model = _model("llama", "sdpa")
    assert not can_pack(model, {k: v for k, v in batch.items() if not k.startswith("packed_")})
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert not can_pack(model, batch)


def test_a_models_layout_is_chosen_once_from_what_it_can_score():
    batch = _batch(_pairs())
    longest_position = int(batch["packed_positions"].max())
    assert pair_layout(_model("llama", "sdpa")) == PairLayout(packed=True, window=None)
    assert pair_layout(_model("llama", "sdpa"), share_prompt=False) == PairLayout(packed=False, window=None)
    narrow = pair_layout(_model("phi3", "sdpa", sliding_window=longest_position))
    assert narrow.packed and narrow.window == longest_position
    assert not narrow.fits(batch)  # such a batch is collated in two rows instead
    assert PairLayout(window=longest_position + 2).fits(batch)
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert pair_layout(model) == PairLayout(packed=False, window=None)


def test_a_packed_only_batch_is_refused_by_a_model_that_cannot_score_it():
    packed = pack_pairs(_pairs(), 0)
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="packed rows only"):
        pair_logps(model, packed)
