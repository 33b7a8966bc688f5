"""dpo_loss against an independent float64 implementation and closed forms."""

import math

import pytest
import torch

from qod_lightning.losses import chosen_nll, dpo_loss

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def reference_dpo(pc, pr, rc, rr, beta, eps):
    """Plain-Python float64 transcription of Rafailov et al. eq. 7 (+ conservative smoothing)."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        z = beta * ((a - c) - (b - d))
        log_sig = -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))
        log_sig_neg = log_sig - z
        out.append(-(1 - eps) * log_sig - eps * log_sig_neg)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_matches_float64_reference(beta, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 30 - 50 for _ in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, eps)
    torch.testing.assert_close(losses, reference_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


def test_policy_equal_reference_gives_log2():
    x, y = torch.randn(8), torch.randn(8)
    losses, chosen, rejected = dpo_loss(x, y, x, y, beta=0.1)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_loss_falls_as_chosen_margin_grows():
    margins = torch.linspace(-5, 5, 11)
    zeros = torch.zeros(11)
    losses, _, _ = dpo_loss(margins, zeros, zeros, zeros, beta=1.0)
    assert torch.all(losses[1:] < losses[:-1])


def test_beta_scales_implicit_reward():
    pc, pr, rc, rr = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([0.0])
    _, c1, r1 = dpo_loss(pc, pr, rc, rr, beta=0.1)
    _, c2, r2 = dpo_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(c2, 3 * c1)
    torch.testing.assert_close(r2, 3 * r1)


def test_zero_smoothing_is_plain_dpo():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(16, generator=g) for _ in range(4)]
    plain = -torch.nn.functional.logsigmoid(0.1 * ((args[0] - args[2]) - (args[1] - args[3])))
    torch.testing.assert_close(dpo_loss(*args, beta=0.1, label_smoothing=0.0)[0], plain)


def test_gradient_raises_chosen_relative_to_rejected():
    pc = torch.zeros(4, requires_grad=True)
    pr = torch.zeros(4, requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.zeros(4), torch.zeros(4), beta=0.1)
    losses.sum().backward()
    # Gradient descent moves against the gradient: chosen up, rejected down.
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)


def test_rewards_are_detached():
    pc = torch.zeros(2, requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_rejects_bad_smoothing():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)


def test_chosen_nll_is_the_per_token_mean_and_an_empty_answer_gives_zero():
    logps = torch.tensor([-6.0, -3.0, 0.0], dtype=torch.float64)
    tokens = torch.tensor([3, 1, 0])
    torch.testing.assert_close(chosen_nll(logps, tokens), torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64))
