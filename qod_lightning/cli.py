"""Command line: ``python -m qod_lightning COMMAND ...``."""

from __future__ import annotations

import importlib
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

COMMANDS = {
    "fit": "train a model (SFT or DPO) from a LightningCLI config: fit --config configs/sft.yaml",
    "validate": "run validation of a config's model and data",
    "test": "run the test loop of a config's model and data",
    "data": "dataset tools: data generate --num-sft N --seed S",
    "translate": 'request -> validated CreateSession JSON: translate --model DIR "REQUEST"',
    "evaluate": "score a model (or predictions) on an eval set: evaluate --model DIR --output report.json",
    "compare": "compare models: compare --models base=P sft=P dpo=P --out-dir DIR",
    "merge": "fold an adapter into its base: merge --adapter DIR --output DIR",
    "pipeline": "SFT -> DPO -> merge -> evaluate -> compare: pipeline --config configs/pipeline/embedded.yaml",
    "bench": "time our SFT/DPO against TRL's, and generation: bench --compare trl --model tiny",
}

MODULE_COMMANDS = ("translate", "evaluate", "compare", "merge", "pipeline", "bench")
"""Commands implemented in :mod:`qod_lightning.commands` (one module each, with ``main(argv)``)."""


class QoDCLI(LightningCLI):
    """LightningCLI whose data module shares the model's tokenizer path, and which checks the strategy's devices.

    It adds one option, ``--generation_checks`` (default true): ``false`` drops the configs'
    :class:`~qod_lightning.callbacks.GenerationEvaluation` callbacks, for a caller that evaluates
    the trained model itself, on the whole set (the pipeline does, and logs that to TensorBoard).
    """

    def add_arguments_to_parser(self, parser) -> None:
        """Link ``data.model_name_or_path`` to the model's, so a config names the model once."""
        parser.link_arguments("model.init_args.model.model_name_or_path", "data.init_args.model_name_or_path")
        parser.add_argument(
            "--generation_checks", type=bool, default=True, help="run the configs' GenerationEvaluation callbacks"
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args``; when a caller passes them (the pipeline, tests), ``sys.argv`` is not the CLI's.

        LightningCLI warns when it gets ``args`` while ``sys.argv`` holds arguments; inside
        ``python -m qod_lightning pipeline`` that is by design (each stage gets its own arguments),
        so the warning would only confuse.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        """Drop the generation checks when ``--generation_checks false``."""
        from qod_lightning.callbacks import GenerationEvaluation

        if not self.config[self.subcommand].generation_checks:
            self.trainer.callbacks = [cb for cb in self.trainer.callbacks if not isinstance(cb, GenerationEvaluation)]

    before_validate = before_test = before_fit  # the checks also run at the end of those loops

    def before_instantiate_classes(self) -> None:
        """Check the config's inputs before building anything.

        Refuses a single-device strategy given several devices (:func:`check_one_device`), and a
        model, starting adapter or data file that is not there (:func:`check_training_inputs`).
        """
        from qod_lightning.preflight import check_training_inputs
        from qod_lightning.strategy import check_one_device

        config = self.config[self.subcommand] if self.subcommand else self.config
        check_one_device(config.trainer.strategy, config.trainer.devices, config.trainer.num_nodes)
        model_args = config.model.init_args.get("model") if config.get("model") else None
        data_args = config.data.init_args if config.get("data") else None
        if model_args is not None and data_args is not None:
            config_files = config.get("config") or []
            config_file = str(config_files[-1]) if config_files else None
            check_training_inputs(dict(vars(model_args)), dict(vars(data_args)), config_file)


def cli_main(args: list[str] | None = None, run: bool = True) -> QoDCLI:
    """Run LightningCLI (``fit``/``validate``/``test``...) in-process; tests call this directly.

    Args:
        args: Command-line arguments after the program name (default: ``sys.argv[1:]``).
        run: Whether to run the subcommand (``False``: only instantiate, with no subcommand).

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` are ready for inspection).

    """
    return QoDCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    return "usage: python -m qod_lightning COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; ``--help`` lists them.

    Args:
        argv: Arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.

    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("fit", "validate", "test", "predict"):
        from qod_lightning.preflight import SetupError

        try:
            cli_main([command, *rest])
        except SetupError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        return 0
    if command == "data":
        if not rest or rest[0] != "generate":
            print("usage: python -m qod_lightning data generate [--help]", file=sys.stderr)
            return 2
        from qod_lightning.data.generator.generate import main as generate_main

        return generate_main(rest[1:])
    if command in MODULE_COMMANDS:
        module = importlib.import_module(f"qod_lightning.commands.{command}")
        return module.main(rest)
    print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
