"""The synthetic request generator: it writes the committed SFT, preference and evaluation datasets.

A seeded random source draws a structured request (:mod:`~qod_lightning.data.generator.spec`),
derives its one canonical ``CreateSession`` body, and renders the request as user text from word
banks (:mod:`~qod_lightning.data.generator.phrasing`) and sentence frames, with the held-out
evaluation frames kept apart from the training ones (:mod:`~qod_lightning.data.generator.templates`).
Preference pairs get a rejected answer that makes a small model's typical mistake
(:mod:`~qod_lightning.data.generator.rejected`), and answers can open with a scratchpad note
(:mod:`~qod_lightning.data.generator.notes`). :mod:`~qod_lightning.data.generator.generate` puts
these together and writes the JSONL files (``python -m qod_lightning data generate``). The loaders
beside this package in :mod:`qod_lightning.data` only read those files; what both sides share (the
system prompt, the JSON layout of an answer) lives in :mod:`qod_lightning.data.prompts`.
"""
