"""What a new sequence length costs each SDPA backend: first call vs a repeat (needs a CUDA GPU).

    python benchmarks/sdpa_shapes.py

One call is a forward and backward of ``scaled_dot_product_attention`` with a boolean causal
mask, bf16, batch 4, 32 heads of 96 (Phi-3-mini's attention), in milliseconds. Each backend set
gets lengths no other set used, so no set profits from another's per-shape cache. Why
``AdapterModule.setup`` turns cuDNN attention off on a GPU: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NOT_CUDNN = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
SETS: dict[str, tuple[list[SDPBackend] | None, tuple[int, ...]]] = {
    "default": (None, (590, 590, 601, 601, 613, 640)),
    "no-cudnn": (NOT_CUDNN, (620, 620, 631, 631, 643, 704)),
    "cudnn-only": ([SDPBackend.CUDNN_ATTENTION], (650, 650, 661, 661, 673, 768)),
    "efficient-only": ([SDPBackend.EFFICIENT_ATTENTION], (680, 680, 691, 691, 703, 832)),
}


def call_ms(length: int, backends: list[SDPBackend] | None) -> float:
    """Milliseconds of one masked attention forward + backward at ``length`` tokens."""
    q, k, v = (
        torch.randn(4, 32, length, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    mask = torch.ones(length, length, device="cuda", dtype=torch.bool).tril()[None, None].expand(4, 1, length, length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
    out.sum().backward()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) * 1e3, 1)


def main() -> None:
    """Print (length, ms) for every backend set."""
    print("cudnn_sdp_enabled", torch.backends.cuda.cudnn_sdp_enabled(), "cudnn", torch.backends.cudnn.version())
    call_ms(300, None)  # CUDA context, cuBLAS handles
    for name, (backends, lengths) in SETS.items():
        try:
            print(name, [(length, call_ms(length, backends)) for length in lengths])
        except RuntimeError as err:  # a backend that refuses these inputs
            print(name, "failed:", str(err).splitlines()[0][:200])


if __name__ == "__main__":
    main()
