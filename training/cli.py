"""``diffsteer train METHOD``: run a training method from a YAML config.

    diffsteer train alignprop --config alignprop.yaml [--resume] [--set key=value ...]
    diffsteer train alignprop --print-config            # every field with its default and help, as YAML
    diffsteer train smpo --config smpo-proving-ground    # a shipped config, by name
    diffsteer train smpo --help                          # the options and smpo's config fields

The same entry point runs in several processes: ``torchrun --nproc_per_node N -m diffsteer.training.alignprop --config ...``
(or ``accelerate launch --multi_gpu --num_processes N -m diffsteer.training.alignprop ...``); see :mod:`diffsteer.training.trainer`.
Each method is a module with a config dataclass and a trainer class (the trl pairing); adding one is an entry in
:data:`METHODS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.config_io import load_config, render_yaml, shipped_configs
from diffsteer.training.trainer import TrainingInterrupted

# method -> (module, config class, trainer class)
METHODS: dict[str, tuple[str, str, str]] = {
    "alignprop": ("diffsteer.training.alignprop", "AlignPropConfig", "AlignPropTrainer"),
    "fdistill": ("diffsteer.training.fdistill", "FDistillConfig", "FDistillTrainer"),
    "dpo": ("diffsteer.training.dpo", "DPOConfig", "DPOTrainer"),
    "smpo": ("diffsteer.training.smpo", "SmPOConfig", "SmPOTrainer"),
    "grpo": ("diffsteer.training.grpo", "GRPOConfig", "GRPOTrainer"),
    "nft": ("diffsteer.training.nft", "NFTConfig", "NFTTrainer"),
    "latent-evaluator": ("diffsteer.training.latent_evaluator", "LatentEvaluatorConfig", "LatentEvaluatorTrainer"),
}


def add_train_parser(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune or distil a model (AlignProp, f-distill, ...) from a YAML config",
        add_help=False,  # `train METHOD --help` lists that method's fields: see run_parsed
    )
    train.add_argument("method", nargs="?", choices=sorted(METHODS), help="training method")
    train.add_argument("-h", "--help", action="store_true", help="show this help and the method's config fields")
    add_method_arguments(train)
    train.set_defaults(func=lambda args: run_train(args, train))


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.method is None:
        if args.help:
            print(parser.format_help(), end="")
            return 0
        parser.error(f"name a training method: {', '.join(sorted(METHODS))}")
    return run_parsed(args.method, args, parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML config file, or the name of a shipped one ({', '.join(shipped_configs())}); "
        "fields: see --help or --print-config",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), e.g. --set max_steps=200",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir/checkpoints (exactly as if never stopped)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the config (defaults + file + --set) as YAML and exit"
    )


def run_parsed(method: str, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    module_name, config_name, trainer_name = METHODS[method]
    module = importlib.import_module(module_name)
    if getattr(args, "help", False) and parser is not None:
        print(parser.format_help())
        print(f"{method}'s config fields (in the --config file, or --set KEY=VALUE), with their defaults:\n")
        print(render_yaml(load_config(getattr(module, config_name))), end="")
        return 0
    config = load_config(getattr(module, config_name), args.config, args.overrides)
    if args.print_config:
        print(render_yaml(config), end="")
        return 0
    trainer = getattr(module, trainer_name)(config)
    try:
        summary = trainer.train(resume=args.resume)
    except TrainingInterrupted as e:
        if trainer.processes.is_main:
            print(f"diffsteer: {e}", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    for key in ("adapter", "pipeline", "latent_evaluators"):
        if summary.get(key):
            print(summary[key])
    return 0


def run_method(method: str, argv: list[str] | None = None) -> int:
    """``python -m training.<method> ...``: the method's options without the ``train METHOD`` prefix."""
    parser = argparse.ArgumentParser(prog=f"python -m training.{method}", description=f"diffsteer train {method}")
    add_method_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_parsed(method, args)
    except InvalidInput as e:
        print(f"diffsteer: error: {e}", file=sys.stderr)
        return 2
