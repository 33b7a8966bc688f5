"""One module per command: ``translate``, ``evaluate``, ``compare``, ``merge``, ``pipeline``, ``bench``.

Dispatched by :mod:`qod_lightning.cli`. Each command module has ``build_parser()``
and ``main(argv) -> int``. Expected failures (a missing file, a malformed dataset, an unloadable
model) end in one ``error: ...`` line on stderr and a nonzero exit status, never a traceback;
``pipeline`` is the exception (:mod:`qod_lightning.commands.pipeline`). The functions below are
the library side that the pipeline (:mod:`qod_lightning.pipeline`) calls.
"""

from qod_lightning.commands.compare import write_comparison
from qod_lightning.commands.evaluate import evaluate_model

__all__ = ["evaluate_model", "write_comparison"]
