"""qod_lightning: QLoRA SFT and hand-written DPO that teach an LLM to write CAMARA QoD requests."""

import logging


def _drop_hub_kernel_warning(record: logging.LogRecord) -> bool:
    """Keep bitsandbytes' import-time warning about its hub kernel out of our commands' output.

    On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch a bf16 4-bit kernel from the
    model hub (the ``kernels`` package) and warns when it cannot. That kernel serves only the
    bf16 inference path that :func:`qod_lightning.model.use_portable_4bit_kernels` turns off, so
    its absence changes nothing here.
    """
    return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_warning)

__version__ = "0.1.0"
