"""The DPO objective as a pure function of sequence log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss per pair.

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
    ``L = -log sigmoid(beta * D)`` with ``D = (pc - rc) - (pr - rr)``, the policy's log-ratio
    margin of chosen over rejected minus the reference's. With ``label_smoothing = e > 0`` this is
    conservative DPO, which assumes preferences are flipped with probability ``e``:
    ``L = -(1 - e) log sigmoid(beta * D) - e log sigmoid(-beta * D)``.

    Args:
        policy_chosen_logps: (B,) policy log-probs of the chosen responses.
        policy_rejected_logps: (B,) policy log-probs of the rejected responses.
        ref_chosen_logps: (B,) reference log-probs of the chosen responses.
        ref_rejected_logps: (B,) reference log-probs of the rejected responses.
        beta: Strength of the implicit KL penalty; 0.1 is the usual choice.
        label_smoothing: Probability ``e`` in [0, 0.5) that a preference label is wrong.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The rewards are the implicit
        rewards ``beta * (policy - reference)`` log-ratios, detached.

    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)  # beta * D
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen answer, the term RPO adds to DPO.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3:
    ``L = L_DPO + alpha * (-log pi(y_w | x) / |y_w|)``. It keeps the policy writing the chosen
    answers, which pure DPO may lower along with the rejected ones as long as the margin grows.

    Args:
        policy_chosen_logps: (B,) summed policy log-probs of the chosen answers.
        chosen_tokens: (B,) numbers of tokens in those answers (an empty answer counts as one, so
            its zero log-prob gives a zero term, not NaN).

    Returns:
        (B,) mean negative log-probability per token of each chosen answer.

    """
    return -policy_chosen_logps / chosen_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
