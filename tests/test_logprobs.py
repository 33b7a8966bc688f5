"""sequence_logps / response_logps against a hand loop over tokens; batch_logps against one row at a time."""

import json
import math

import pytest
import torch

from qod_lightning.data.preference import PreferenceDataModule
from qod_lightning.logprobs import PairLayout, batch_logps, pair_logps, response_logps, sequence_logps
from qod_lightning.model import ModelSettings
from qod_lightning.modules import DPOModule

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def loop_logps(logits, labels):
    out = []
    for b in range(labels.size(0)):
        total = 0.0
        for t in range(1, labels.size(1)):
            if labels[b, t] != -100:
                row = logits[b, t - 1].double()
                total += (row[labels[b, t]] - torch.logsumexp(row, 0)).item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def make(b=3, t=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :5] = -100
    labels[1, 6:] = -100  # padding
    labels[2, :] = -100  # empty response
    return logits, labels


def test_matches_hand_loop():
    logits, labels = make()
    logps, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(logps.double(), loop_logps(logits, labels), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [4, 1, 0]


def test_empty_response_is_zero_not_nan():
    logits, labels = make()
    logps, _ = sequence_logps(logits, labels)
    assert logps[2].item() == 0.0 and not math.isnan(logps[2].item())


def test_prompt_and_padding_contribute_nothing():
    logits, labels = make()
    before, _ = sequence_logps(logits, labels)
    changed = logits.clone()
    changed[0, :2] += 100.0  # positions predicting prompt tokens 1..2 (masked)
    changed[1, 6:] -= 50.0  # position predicting nothing (last) and padding
    after, _ = sequence_logps(changed, labels)
    torch.testing.assert_close(before, after)


def test_response_path_equals_full_logits():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 5, generator=g)
    head = torch.nn.Linear(5, 11, bias=False)
    _, labels = make()
    full, counts_full = sequence_logps(head(hidden), labels)
    fast, counts_fast = response_logps(hidden, head, labels)
    torch.testing.assert_close(full, fast)
    assert torch.equal(counts_full, counts_fast)


def test_gradients_flow_only_through_response_positions():
    logits, labels = make()
    logits.requires_grad_(True)
    sequence_logps(logits, labels)[0].sum().backward()
    assert torch.all(logits.grad[2] == 0)  # empty response: no gradient at all
    assert torch.all(logits.grad[0, :2] == 0)  # positions predicting prompt tokens


def test_concatenated_pass_equals_separate_passes(tiny_model_dir, small_data):
    dm = PreferenceDataModule(str(tiny_model_dir), str(small_data["preferences"]), val_fraction=0.0, batch_size=3)
    dm.setup("fit")
    dm.layout = PairLayout(packed=False)
    module = DPOModule(ModelSettings(str(tiny_model_dir)))
    module.model.eval()
    items = [dm.train_set[i] for i in range(3)]
    together, _ = batch_logps(module.model, dm.collate(items))
    for k, key in enumerate(("chosen_ids", "rejected_ids")):
        for j, item in enumerate(items):
            ids = torch.tensor([item["prompt_ids"] + item[key]])
            labels = torch.tensor([[-100] * len(item["prompt_ids"]) + item[key]])
            logits = module.model(input_ids=ids).logits
            alone, _ = sequence_logps(logits, labels)
            torch.testing.assert_close(together[k * 3 + j], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_a_whole_step_pair_keeps_the_dpo_margin_of_its_whole_answers(tiny_model_dir, tmp_path, packed):
    # The tokens both answers share add the same log-prob to each, so moving them into the prompt
    # leaves log p(chosen) - log p(rejected), the only thing DPO sees of the policy, unchanged.
    pairs = [
        {"prompt": "gaming 2 hours", "chosen": '{"q":"QOS_E","d":7200}', "rejected": '{"q":"QOS_E","d":3600}'},
        {"prompt": "video", "chosen": '{"q":"QOS_M","d":86400}', "rejected": '{"q":"QOS_L","d":86400}'},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    module = DPOModule(ModelSettings(str(tiny_model_dir)))
    module.model.eval()
    margins = []
    for step_tokens in (None, 1000):
        dm = PreferenceDataModule(
            str(tiny_model_dir), str(path), val_fraction=0.0, batch_size=2, step_tokens=step_tokens
        )
        dm.setup("fit")
        dm.layout = PairLayout(packed=packed)
        logps = pair_logps(module.model, dm.collate([dm.train_set[0], dm.train_set[1]]))  # (2B,)
        margins.append(logps[:2] - logps[2:])
    torch.testing.assert_close(margins[0], margins[1], rtol=1e-4, atol=1e-4)
