"""``pipeline``: run the whole method from a pipeline config (:mod:`qod_lightning.pipeline`), with overrides.

Unlike the other commands it does not turn failures into one ``error:`` line: a bad config is an
argparse error (exit status 2), and a stage that fails stops the run with its traceback.
"""

from __future__ import annotations

import argparse

from qod_lightning.commands.common import positive_int
from qod_lightning.pipeline import PipelineConfig, run_pipeline


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning pipeline",
        description="The whole method in one command: base -> SFT -> DPO -> merge -> evaluation of all three -> "
        "comparison.",
    )
    parser.add_argument("--config", default="configs/pipeline/embedded.yaml", help="pipeline YAML")
    parser.add_argument("--force", action="store_true", help="redo stages whose artifacts exist")
    parser.add_argument("--work-dir", help="override the config's work_dir")
    parser.add_argument("--model", help="override the config's base model")
    parser.add_argument("--max-eval-samples", type=positive_int, help="evaluate on the first N records only")
    parser.add_argument("--no-constrained", action="store_true", help="skip constrained evaluation")
    parser.add_argument("--fit-arg", action="append", default=[], help="extra LightningCLI argument (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m qod_lightning pipeline --config FILE [--force]``.

    Args:
        argv: Arguments after the command name (``sys.argv`` when ``None``).

    Returns:
        0 once every stage has run (a failure raises).

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = PipelineConfig.from_yaml(args.config)
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"bad pipeline config: {err}")
    if args.work_dir:
        cfg.work_dir = args.work_dir
    if args.model:
        cfg.model = args.model
    if args.max_eval_samples is not None:
        cfg.max_eval_samples = args.max_eval_samples
    if args.no_constrained:
        cfg.constrained = False
    cfg.fit_args = [*cfg.fit_args, *args.fit_arg]
    run_pipeline(cfg, force=args.force)
    return 0
