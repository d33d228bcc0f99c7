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


def cmd_run(args) -> int:
    from flows.main import run_main

    options = {"nproc": args.nproc, "register_model": not args.no_register}
    if args.dask:
        options["dask"] = args.dask
    run_main(args.config, args.root, args.overrides, options=options)
    return 0


def cmd_prepare(args) -> int:
    from pipeline.prepare import prepare_dataset, summary

    cfg = load_run_config(args.config, args.overrides)
    dataset = prepare_dataset(cfg.data, args.root)
    print(json.dumps(summary(dataset), indent=2))
    return 0


def cmd_train(args) -> int:
    from pipeline import storage
    from pipeline.launch import launch_training, run_directory
    from pipeline.lm import write_lm_metadata
    from pipeline.prepare import prepare_dataset

    cfg = load_run_config(args.config, args.overrides)
    root = storage.storage_root(args.root)
    dataset = prepare_dataset(cfg.data, root)
    run_dir = run_directory(root, dataset.dataset_id, cfg.model, cfg.train)
    print(f"training in {run_dir} on dataset {dataset.uri} with {args.nproc} process(es)", flush=True)
    result = launch_training(run_dir, dataset.uri, cfg, nproc=args.nproc, on_line=lambda line: print(line, flush=True))
    write_lm_metadata(run_dir, dataset)
    print(json.dumps({"run_dir": run_dir, **(result.result or {})}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from pipeline.registry import generate_from_uri

    target = args.run or args.model
    text = generate_from_uri(target, args.prefix, num_tokens=args.num_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, root=args.root)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the bundled presets")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("run", help="the main job: the retrain flow (prepare, train, evaluate, register)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="training processes on this machine (torchrun); default 1")
    p.add_argument("--dask", default=None, help="map data stages on Dask: 'local', 'local-threads' or a scheduler address")
    p.add_argument("--no-register", action="store_true", help="skip MLflow registration and the champion gate")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("prepare", help="fetch, tokenize and shard a corpus")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="prepare the data and train (DDP with --nproc > 1)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="training processes on this machine (torchrun); default 1")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate text from a trained run or a registered model")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a run directory (rnnlm train prints it)")
    where.add_argument("--model", help="an MLflow model URI, e.g. models:/rnnlm-timemachine-char@champion")
    p.add_argument("--prefix", required=True, help="text to warm up on; the output continues it")
    p.add_argument("--num-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--root", default=None, help="storage root holding the default MLflow database")
    p.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    try:
        return args.fn(args)
    except PipelineError as e:
        print(f"rnnlm: error: {e}", file=sys.stderr)
        return EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
