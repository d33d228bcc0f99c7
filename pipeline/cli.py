"""The ``rnnlm`` command line.

    rnnlm run                      the main job: the retrain flow on the default preset
    rnnlm prepare [--config X]     fetch, tokenize and shard a corpus; print the manifest summary
    rnnlm train --config X [--nproc N]
    rnnlm generate --run DIR | --model models:/NAME@ALIAS --prefix "time traveller"

``--config`` takes a preset name (``rnnlm presets`` lists them) or a YAML file;
``--set section.key=value`` overrides single values.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import DEFAULT_PRESET, load_run_config, preset_names
from pipeline.errors import EXIT_DO_NOT_RETRY, EXIT_FAILED, PipelineError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_PRESET, help=f"preset name or YAML file (default {DEFAULT_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one value, e.g. train.epochs=3")
    p.add_argument("--root", default=None, help="artifact storage root (default $RNNLM_STORAGE or ./.rnnlm)")


def cmd_presets(args) -> int:
    for name in preset_names():
        print(name)
    return 0


def cmd_prepare(args) -> int:
    from pipeline.prepare import prepare_dataset, summary

    cfg = load_run_config(args.config, args.overrides)
    dataset = prepare_dataset(cfg.data, args.root)
    print(json.dumps(summary(dataset), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the bundled presets")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("prepare", help="fetch, tokenize and shard a corpus")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except PipelineError as e:
        print(f"rnnlm: error: {e}", file=sys.stderr)
        return EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
