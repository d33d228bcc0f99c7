"""The ``rnnlm`` command line.

    rnnlm run                      the main job: the retrain flow on the default preset
    rnnlm run --pin-vocab champion the same, on the current champion's vocabulary (nightly retrains)
    rnnlm run --sweep FILE         several trials (a grid or a random sample), the best registered
    rnnlm prepare [--config X]     fetch, tokenize and shard a corpus; print the manifest summary
    rnnlm train --config X [--nproc N]
    rnnlm run --launcher ray --ray-address auto --workers N [--gpus-per-worker K]   (a Ray cluster)
    rnnlm generate --run DIR | --model models:/NAME@ALIAS --prefix "time traveller" [--prefix "the" ...]
    rnnlm server [--port 4200]     a Prefect server on 127.0.0.1 (SQLite under <root>/prefect)
    rnnlm deploy                   create the work pools and deploy deployments/prefect.yaml
    rnnlm worker --pool cpu        a process worker for one work pool (control, cpu, gpu)
    rnnlm ls [--json]              what the storage root holds: versions, runs, datasets, sizes, references
    rnnlm gc [--yes]               apply the retention policy (dry run without --yes; docs/retention.md)

``--config`` takes a preset name (``rnnlm presets`` lists them) or a YAML file;
``--set section.key=value`` overrides single values.

A failure ends with one line, ``rnnlm: error: ...``, and exit code 3 when retrying cannot
help (bad input or config), 1 otherwise. ``rnnlm run`` also writes its whole log, tracebacks
included, to ``<root>/logs/run-<time>.log`` (named in that line); ``--verbose`` shows the
tracebacks on the terminal too. On a terminal, ``run``, ``train`` and ``prepare`` show one live
progress line per stage (``flows.progress``); ``--quiet`` (or ``--verbose``, or output that is
not a terminal) keeps the plain log lines. Every command runs with telemetry off
(``flows.servers.TELEMETRY_OFF``), and so does every process it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from flows.progress import live_progress, wanted
from flows.servers import TELEMETRY_OFF
from flows.terminal import configure_logging, console_problems_only, run_log_file, verdict
from pipeline import storage
from pipeline.config_sources import DEFAULT_PRESET, load_run_config, preset_names
from pipeline.errors import EXIT_DO_NOT_RETRY, EXIT_FAILED, ConfigError, GenerationInputError, PipelineError



def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_PRESET, help=f"preset name or YAML file (default {DEFAULT_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one value, e.g. train.epochs=3")
    p.add_argument("--root", default=None, help="artifact storage root (default $RNNLM_STORAGE or ./.rnnlm)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no live progress display on a terminal: plain log lines, as in CI or a pipe")


def _add_launcher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", "--workers", dest="nproc", type=int, default=1,
                   help="training processes: on this machine (torchrun) or Ray workers (--launcher ray); default 1")
    p.add_argument("--launcher", choices=["torchrun", "ray"], default="torchrun",
                   help="torchrun (this machine, default) or ray (a Ray Train job; pip install 'rnnlm[ray]')")
    p.add_argument("--ray-address", default=None, help="--launcher ray: auto (default), local, ray://HOST:10001 or HOST:PORT")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="--launcher ray: GPUs per worker (default 0: CPU)")


def cmd_presets(args) -> int:
    for name in preset_names():
        print(name)
    return 0


def cmd_run(args) -> int:
    from flows.main import check_free_space, embedded_server, run_main
    from flows.reports import print_report

    root = storage.storage_root(args.root)
    check_free_space(root)  # before the log file or the server's database
    options = {"nproc": args.nproc, "register_model": not args.no_register, **_launcher_options(args)}
    server = embedded_server(root)  # first: it starts on another core while this process imports
    import prefect  # noqa: F401 (sets up its logging on import: ours goes on top)

    args.log_file = run_log_file(args.root)
    configure_logging(args.verbose, args.log_file)
    if args.pin_vocab:
        options["pin_vocab"] = args.pin_vocab
    if args.dask:
        options["dask"] = args.dask
    show = wanted(args.quiet, args.verbose)
    with live_progress(show):
        summary = run_main(args.config, args.root, args.overrides, options=options, print_summary=False,
                           server=server, sweep=args.sweep)
    print_report(summary)
    if show:
        console_problems_only()  # the summary is the last word on a terminal; the log file has the rest
    return 0


def _launcher_options(args) -> dict:
    if args.launcher == "torchrun":
        if args.ray_address or args.gpus_per_worker is not None:
            raise ConfigError("--ray-address and --gpus-per-worker need --launcher ray")
        return {}
    return {"launcher": "ray", "ray_address": args.ray_address or "auto", "gpus_per_worker": args.gpus_per_worker or 0}


def cmd_prepare(args) -> int:
    from pipeline.data.prepare import prepare_dataset, summary

    cfg = load_run_config(args.config, args.overrides)
    with live_progress(wanted(args.quiet, args.verbose)):
        dataset = prepare_dataset(cfg.data, args.root)
    print(json.dumps(summary(dataset), indent=2))
    return 0


def cmd_train(args) -> int:
    from pipeline.training.launch import launch_training, run_directory
    from pipeline.model.lm import write_lm_metadata
    from pipeline.data.prepare import prepare_dataset
    from pipeline.training.ray_launch import RayCluster

    opts = _launcher_options(args)
    ray = RayCluster(address=opts["ray_address"], gpus_per_worker=opts["gpus_per_worker"]) if opts else None
    cfg = load_run_config(args.config, args.overrides)
    root = storage.storage_root(args.root)
    show = wanted(args.quiet, args.verbose)
    with live_progress(show):
        dataset = prepare_dataset(cfg.data, root)
        run_dir = run_directory(root, dataset.dataset_id, cfg.model, cfg.train)
        where = f"Ray workers on {ray.address}" if ray else "process(es)"
        print(f"training in {run_dir} on dataset {dataset.uri} with {args.nproc} {where}", flush=True)
        # on a terminal the display shows the trainer's progress; its log lines stay out of the way
        result = launch_training(run_dir, dataset.uri, cfg, nproc=args.nproc, ray=ray,
                                 on_line=None if show else (lambda line: print(line, flush=True)))
    write_lm_metadata(run_dir, dataset)
    print(json.dumps({"run_dir": run_dir, **(result.result or {})}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from pipeline.model.generate import MAX_NUM_TOKENS, check_request, check_settings
    from pipeline.registry.consumer import generate_many_from_uri

    prefixes = list(args.prefix) + (_read_prefix_file(args.prefix_file) if args.prefix_file else [])
    if not prefixes:
        raise GenerationInputError("no prefix: give --prefix TEXT (repeatable) or --prefix-file FILE")
    check_settings(args.num_tokens, args.temperature, args.top_k, args.seed, max_num_tokens=MAX_NUM_TOKENS)
    check_request(prefixes, args.num_tokens)
    target = args.run or args.model
    try:
        texts = generate_many_from_uri(target, prefixes, num_tokens=args.num_tokens, temperature=args.temperature,
                                       top_k=args.top_k, seed=args.seed, root=args.root, device=args.device)
    except Exception as e:  # the registered model answers bad input as the served model does: HTTP 400
        if getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE":
            raise GenerationInputError(getattr(e, "message", str(e))) from e
        raise
    for text in texts:
        print(text)
    return 0


def _read_prefix_file(path: str) -> list[str]:
    """One prefix per line (empty lines skipped); ``-`` reads standard input."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationInputError(f"--prefix-file {path}: cannot be read: {e}") from None
    return [line for line in text.splitlines() if line.strip()]


def cmd_server(args) -> int:
    from flows import servers

    env = servers.server_env(home=args.home, database_url=args.database_url, root=args.root)
    print(f"Prefect server on http://{args.host}:{args.port} (PREFECT_HOME={env.get('PREFECT_HOME', '~/.prefect')}"
          f"{', database from PREFECT_API_DATABASE_CONNECTION_URL' if env.get('PREFECT_API_DATABASE_CONNECTION_URL') else ''})",
          flush=True)
    servers.exec_(servers.server_command(args.host, args.port), env)
    return 0  # not reached


def cmd_deploy(args) -> int:
    from flows import servers

    limits = {}
    for item in args.pool_limit:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise ConfigError(f"--pool-limit {item!r}: expected POOL=N, e.g. gpu=1")
        limits[name] = int(value)
    if limits:
        servers.ensure_pools(limits=limits, url=args.api_url)
    return servers.deploy(args.prefect_file, tuple(args.name), url=args.api_url, pools=not args.no_pools)


def cmd_worker(args) -> int:
    from flows import servers

    root = storage.storage_root(args.root)
    block = None if storage.is_local(root) else servers.results_block_for(root, args.api_url)
    env = servers.worker_env(root=root, repo_dir=args.repo_dir, url=args.api_url, results_block=block)
    servers.prepare_tracking_db(env)
    print(f"worker for pool {args.pool}: API {env['PREFECT_API_URL']}, storage {root}, repo {env[servers.ENV_REPO_DIR]}",
          flush=True)
    servers.exec_(servers.worker_command(args.pool, args.name, args.limit), env)
    return 0  # not reached


def _retention_policy(args):
    from pipeline.config import RetentionConfig
    from pipeline.config_sources import apply_overrides, read_raw
    from pipeline.config import parse_config

    raw = read_raw(args.policy) if args.policy else {}
    return parse_config(RetentionConfig, apply_overrides(raw, args.overrides), source=args.policy or "--set")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args) -> int:
    from pipeline.store.inventory import take_inventory

    inv = take_inventory(args.root)
    if args.json:
        print(json.dumps(inv.to_dict(), indent=2, sort_keys=True))
        return 0
    print(f"{inv.root}: {_size(inv.bytes)} ("
          + ", ".join(f"{k} {_size(v)}" for k, v in sorted(inv.totals.items(), key=lambda kv: -kv[1])) + ")")
    print("versions (version -> run -> dataset):")
    for v in inv.versions:
        run = inv.runs.get((v.run_dir or "").rstrip("/").rsplit("/", 1)[-1])
        print(f"  {v.key:<28} {','.join(v.aliases) or '-':<20} run {(run.id if run else v.run_dir or '-')}"
              f"  dataset {v.dataset_id or '-'}")
    print("runs:")
    for r in sorted(inv.runs.values(), key=lambda r: -r.mtime):
        print(f"  {r.id}  {r.refs.get('state'):<10} {_size(r.bytes):>9} (checkpoints "
              f"{_size(r.refs.get('checkpoint_bytes', 0))})  {r.age_h(inv.now):7.1f} h  dataset {r.refs.get('dataset') or '?'}")
    print("datasets (-> corpus):")
    for d in sorted(inv.datasets.values(), key=lambda d: -d.mtime):
        print(f"  {d.id}  {_size(d.bytes):>9}  {d.age_h(inv.now):7.1f} h  corpus {', '.join(s[:12] for s in d.refs.get('sources', []))}")
    if inv.other:
        print("other:")
        for o in inv.other:
            print(f"  {o.kind:<10} {o.id}  {_size(o.bytes):>9}  {o.age_h(inv.now):7.1f} h")
    for le in inv.leases:
        print(f"lease {le.uri} holder {le.holder} datasets {le.datasets} runs {le.runs}")
    return 0


def cmd_gc(args) -> int:
    from pipeline.store.inventory import take_inventory
    from pipeline.store.retention import apply_plan, plan_retention

    plan = plan_retention(take_inventory(args.root), _retention_policy(args))
    done = apply_plan(plan) if args.yes else []
    if args.json:
        print(json.dumps({**plan.to_dict(), "applied": args.yes, "deleted": [d.to_dict() for d in done]},
                         indent=2, sort_keys=True))
        return 0
    verb = "deleted" if args.yes else "would delete"
    for d in (done if args.yes else plan.deletions):
        print(f"{verb} {d.kind} {d.id} ({_size(d.bytes)}): {d.reason}")
    total = sum(d.bytes for d in done) if args.yes else plan.bytes
    print(f"{verb} {len(done if args.yes else plan.deletions)} item(s), {_size(total)} of "
          f"{_size(plan.inventory.bytes)} in {plan.inventory.root}" + ("" if args.yes else "; --yes deletes them"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (_presets_parser, _run_parser, _prepare_parser, _train_parser, _generate_parser,
                       _server_parser, _deploy_parser, _worker_parser, _ls_parser, _gc_parser):
        add_parser(sub)
    return parser


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the bundled presets")
    p.set_defaults(fn=cmd_presets)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job: the retrain flow (prepare, train, evaluate, register)")
    _add_config_args(p)
    _add_launcher_args(p)
    p.add_argument("--dask", default=None, help="map data stages on Dask: 'local', 'local-threads' or a scheduler address")
    p.add_argument("--no-register", action="store_true", help="skip MLflow registration and the champion gate")
    p.add_argument("--sweep", default=None, metavar="FILE",
                   help="a sweep file (grid or random over section.key names; docs/sweeps.md): train every trial, "
                        "register the best by validation perplexity")
    p.add_argument("--pin-vocab", choices=["champion"], default=None,
                   help="champion: reuse the current champion's vocabulary (data.vocab.pinned), so a growing corpus "
                        "keeps producing candidates the gate can compare; without a champion yet, build one")
    p.set_defaults(fn=cmd_run)


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="fetch, tokenize and shard a corpus")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="prepare the data and train (DDP with --nproc > 1)")
    _add_config_args(p)
    _add_launcher_args(p)
    p.set_defaults(fn=cmd_train)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run or a registered model")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a run directory (rnnlm train prints it)")
    where.add_argument("--model", help="an MLflow model URI, e.g. models:/rnnlm-timemachine-char@champion")
    p.add_argument("--prefix", action="append", default=[],
                   help="text to warm up on; the output continues it (repeat for several: one batch, one line each)")
    p.add_argument("--prefix-file", default=None, help="a UTF-8 file of prefixes, one per line (- reads stdin)")
    p.add_argument("--num-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (each prefix samples with it)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (a GPU if there is one)")
    p.add_argument("--root", default=None, help="storage root holding the default MLflow database")
    p.set_defaults(fn=cmd_generate)


def _server_parser(sub) -> None:
    p = sub.add_parser("server", help="start a Prefect server (SQLite by default; see deployments/README.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    p.add_argument("--home", default=None, help="PREFECT_HOME (default $PREFECT_HOME, else <root>/prefect)")
    p.add_argument("--database-url", default=None,
                   help="PREFECT_API_DATABASE_CONNECTION_URL, e.g. postgresql+asyncpg://user:pass@host:5432/prefect")
    p.add_argument("--root", default=None, help="artifact storage root (default $RNNLM_STORAGE or ./.rnnlm)")
    p.set_defaults(fn=cmd_server)


def _deploy_parser(sub) -> None:
    p = sub.add_parser("deploy", help="create the work pools and deploy deployments/prefect.yaml")
    p.add_argument("--prefect-file", default=None, help="default deployments/prefect.yaml")
    p.add_argument("--name", action="append", default=[], metavar="FLOW/DEPLOYMENT", help="only these (default all)")
    p.add_argument("--pool-limit", action="append", default=[], metavar="POOL=N", help="set a work pool's concurrency limit")
    p.add_argument("--no-pools", action="store_true", help="do not create missing work pools")
    p.add_argument("--api-url", default=None, help="default $PREFECT_API_URL, else http://127.0.0.1:4200/api")
    p.set_defaults(fn=cmd_deploy)


def _worker_parser(sub) -> None:
    p = sub.add_parser("worker", help="start a process worker for a work pool")
    p.add_argument("--pool", required=True, help="work pool: control, cpu or gpu")
    p.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once on this worker")
    p.add_argument("--root", default=None, help="shared artifact root (default $RNNLM_STORAGE or ./.rnnlm)")
    p.add_argument("--repo-dir", default=None, help="this repository on this host (default $RNNLM_REPO_DIR, else this checkout)")
    p.add_argument("--api-url", default=None, help="default $PREFECT_API_URL, else http://127.0.0.1:4200/api")
    p.set_defaults(fn=cmd_worker)


def _ls_parser(sub) -> None:
    p = sub.add_parser("ls", help="what the storage root holds: versions, runs, datasets, their sizes and references")
    p.add_argument("--root", default=None, help="artifact storage root (default $RNNLM_STORAGE or ./.rnnlm)")
    p.add_argument("--json", action="store_true", help="the whole inventory as JSON")
    p.set_defaults(fn=cmd_ls)


def _gc_parser(sub) -> None:
    p = sub.add_parser("gc", help="apply the retention policy: print what would go (dry run); --yes deletes it")
    p.add_argument("--root", default=None, help="artifact storage root (default $RNNLM_STORAGE or ./.rnnlm)")
    p.add_argument("--yes", action="store_true", help="delete (default: only print what would be deleted)")
    p.add_argument("--policy", default=None, help="YAML file of retention keys (docs/retention.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one retention key, e.g. keep_versions=5")
    p.add_argument("--json", action="store_true", help="the plan (and what was deleted) as JSON")
    p.set_defaults(fn=cmd_gc)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the run unwinds as on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _stop_children(grace_s: float = 10.0) -> None:
    """Stop what this process started and has not stopped yet (a trainer, a local cluster):
    SIGTERM, then SIGKILL after ``grace_s``. The temporary Prefect server (ours, or one Prefect
    started) is left to its atexit stop, which comes once the flow run's last logs have reached it."""
    import psutil

    from flows import servers
    from pipeline.training.processes import stop_process_trees

    keep = {servers._embedded.proc.pid} if servers._embedded is not None and servers._embedded.proc else set()
    server_module = sys.modules.get("prefect.server.api.server")  # loaded only if Prefect started a server
    if server_module:
        keep |= {s.server_process.pid for s in server_module.SubprocessASGIServer._instances.values()
                 if s.server_process is not None}
    stop_process_trees([p for p in psutil.Process().children() if p.pid not in keep], grace_s)


def _root_not_writable(e: BaseException, args) -> PipelineError | None:
    """A write refused for good under the local storage root (a read-only or foreign-owned root)
    as the one-line StorageError naming the root and the path; None for anything else."""
    if not (isinstance(e, OSError) and e.filename and storage.is_unwritable(e)):
        return None
    root = storage.storage_root(getattr(args, "root", None))
    if not storage.is_local(root):
        return None
    base, path = storage.local_path(root), os.path.abspath(str(e.filename))
    if path != base and not path.startswith(base + os.sep):
        return None
    return storage.unwritable(root, path, e)


def _store_failure(e: BaseException, args) -> PipelineError | None:
    """An object store's failure under the storage root (unreachable, refused) as one line naming
    the root and the endpoint; None for anything else."""
    root = getattr(args, "root", None)
    return storage.store_failure(storage.storage_root(root), e) if hasattr(args, "root") else None


def failure_kind(e: BaseException) -> str:
    """How the last line describes an error that may pass on a new run, in the words the flow's
    retry log uses (``tasks.retries.retry_if_retryable``): the two must agree."""
    if isinstance(e, (OSError, TimeoutError, ConnectionError)) or getattr(e, "retryable", False):
        return "retrying may help"
    return "unexpected, so not retried; running it again may help"


def main(argv: list[str] | None = None) -> int:
    os.environ.update(TELEMETRY_OFF)  # before Prefect or MLflow is imported: nothing phones home
    args = build_parser().parse_args(argv)
    args.log_file = None
    configure_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        # What a scheduler, timeout, systemd or Kubernetes send: by default it kills Python outright,
        # so no atexit handler (Prefect's temporary server) and no flow-run cleanup would run.
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.fn(args)
    except PipelineError as e:
        verdict(str(e), args)
        return EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        _stop_children()
        verdict("stopped by SIGTERM; run it again to resume (finished stages are cached, training resumes "
                "from its last checkpoint)", args)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        known = _root_not_writable(e, args) or _store_failure(e, args)
        if known is not None:
            verdict(str(known), args)
            return EXIT_FAILED if known.retryable else EXIT_DO_NOT_RETRY
        if storage.is_disk_full(e):  # a write that did not say so itself: still one line naming the root
            what = getattr(e, "filename", None) or f"{type(e).__name__}: {e}"
            verdict(str(storage.unwritable(storage.storage_root(getattr(args, "root", None)), what, e)), args)
            return EXIT_DO_NOT_RETRY
        if storage.fails_every_time(e):  # what the flow's tasks did not retry either (tasks/retries.py)
            verdict(f"{type(e).__name__}: {e} (retrying cannot fix this)", args)
            return EXIT_DO_NOT_RETRY
        if not args.log_file:
            raise  # no log file to hold the traceback: let Python print it
        verdict(f"{type(e).__name__}: {e} ({failure_kind(e)})", args)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
