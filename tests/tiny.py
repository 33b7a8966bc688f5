"""A tiny random Phi-3 and a locally trained byte-level BPE tokenizer, built in-process (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    '{"device":{"ipv4Address":{"publicAddress":"203.0.113.75","privateAddress":"203.0.113.75"}},'
    '"applicationServer":{"ipv4Address":"192.0.2.200"},"qosProfile":"QOS_E","duration":7200}',
    "### Instruction:\nTranslate the user's request into the JSON body of a CAMARA Quality-on-Demand "
    "CreateSession call (API v0.10.1). Answer with the JSON object only.\n\n### Input:\n",
    "Need gaming session, device 203.0.113.75, server 192.0.2.200, 2 hours\n\n### Response:\n",
    "video call from +44 7700 900123 to 2001:db8::1 for 90 minutes with QOS_M QOS_S QOS_L",
    '"devicePorts":{"ports":[5060]},"webhook":{"notificationUrl":"https://hooks.example.com/x"}',
]


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE: encodes any text, like the real tokenizers it stands in for."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<|end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_phi3(directory: str | Path, seed: int = 0) -> Path:
    """Save a 2-layer Phi-3 with random weights and the tokenizer above into ``directory``."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Phi3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
