"""Prompt formats shared by training, generation and the datasets."""

from __future__ import annotations

import json
from typing import Any

SYSTEM_PROMPT = "Translate the request into a CAMARA QoD CreateSession JSON body."
"""The instruction every record carries (``instruction`` in ``data/sft.jsonl``).

Short on purpose: every prompt carries it, in training and at inference, and a fine-tuned model
learns the task from the examples, not from the wording. It is 16 SmolLM2 tokens; the earlier
two-sentence version was 40, a quarter of an average evaluation prompt.
"""

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""The design's Alpaca prompt; the response follows directly after the last newline."""


def dump_request(request: dict[str, Any]) -> str:
    """Serialise a request the canonical way: compact separators, keys in the dict's order.

    Compact JSON costs the fewest tokens to train on and to generate, and is exactly what
    whitespace-free constrained decoding produces.

    Args:
        request: A ``CreateSession`` body.

    Returns:
        The JSON text.

    """
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False)


def format_alpaca(instruction: str, user_input: str) -> str:
    """Fill the Alpaca template.

    Args:
        instruction: The system instruction.
        user_input: The user's request text.

    Returns:
        The prompt, ending where the response starts.

    """
    return ALPACA_TEMPLATE.format(instruction=instruction, input=user_input)
