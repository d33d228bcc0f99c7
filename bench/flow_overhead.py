"""What Prefect orchestration costs: the ``retrain`` flow vs. the same work called directly.

Three runs on the same RunConfig, each a fresh Python process (as a user would run them):

1. ``direct``: ``pipeline.data.prepare.prepare_dataset`` -> ``pipeline.training.launch.launch_training``
   (the same child-process trainer the flow uses) -> val/test perplexity + 2 samples;
2. ``flow``: ``flows.main.run_main`` (the ``retrain`` flow, its own local Prefect server
   on SQLite started inside, fresh store), without MLflow registration, which is pipeline
   work the direct side does not do (about 15 s in one measurement here);
3. ``cached``: ``run_main`` again on the same store: every stage from cache.

Targets: ``overhead_s = flow_s - direct_s`` <= 10% of the training time + 15 s of
Prefect start-up; ``cached_rerun_s`` <= 20 s. Each run also prints where its time went,
stage by stage, from its own log records (``FLOW_MILESTONES``: server start, each stage's cache
check and verification, the trainer's start-up, training, evaluation, ...; ``stages_s`` in the
JSON). The last line is one JSON object.

    python bench/flow_overhead.py            # the timemachine-char preset, 2 minutes of training
    python bench/flow_overhead.py --short    # ~10 s of training on a slice, for a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))


def overrides_for(args) -> list[str]:
    if args.short:
        return ["data.splits.max_tokens=20000", "model.hidden_size=64", "train.epochs=2", "train.max_minutes=null"]
    # a fixed amount of work (not max_minutes) so both sides train exactly the same steps
    return [f"train.epochs={args.epochs}", "train.max_minutes=null"]


# Where the time goes: milestones found in a run's own log records, in the order they happen.
# A stage is the time from one milestone found to the next (a fully cached re-run skips some).
FLOW_MILESTONES = [
    ("imports (the embedded server starts beside them)", r"^Starting temporary server"),
    ("Prefect server start (what is left of it)", r"^Beginning flow run .* for flow 'retrain'"),
    ("retrain flow start", r"^Beginning subflow run .* for flow 'prepare-data'"),
    ("data stages (cache checks, verification)", r"^Beginning subflow run .* for flow 'train'"),
    ("train task start (cache check)", r"^(training from scratch|resuming training|run .* already finished)"),
    ("launcher (load probe)", r"^launching: "),
    ("trainer start-up", r"^trainer: .*(starting fresh|resum)"),
    ("training", r"^trainer: .*checkpoint .*ckpt-"),
    ("trainer exit, run manifest (hashes)", r"^val perplexity"),
    ("evaluation", r"^sample \d+:"),
    ("flow end, result persistence", r"^Stopping temporary server"),
]
DIRECT_MILESTONES = [
    ("imports", r"^imported$"),
    ("data", r"^dataset ready$"),
    ("launcher (load probe)", r"^launching: "),
    ("trainer start-up", r"^trainer: .*(starting fresh|resum)"),
    ("training", r"^trainer: .*checkpoint .*ckpt-"),
    ("trainer exit", r"^trainer done$"),
    ("evaluation", r"^evaluated$"),
]


class Timeline(logging.Handler):
    """Every log record's time and message (the flow's own logs: Prefect's, the tasks', the trainer's lines)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.created, record.getMessage()))

    def mark(self, message: str) -> None:
        self.events.append((time.time(), message))

    def stages(self, milestones: list[tuple[str, str]]) -> dict[str, float]:
        """Seconds from the process's start to each milestone's *last* match ("training" ends at the
        last checkpoint), taken in order; stages whose milestone never came are left out."""
        start = psutil.Process().create_time()
        out, last = {}, start
        for name, pattern in milestones:
            times = [t for t, msg in self.events if re.search(pattern, msg) and t >= last]
            if not times:
                continue
            at = times[-1] if name == "training" else times[0]
            out[name] = round(at - last, 2)
            last = at
        out["process end"] = round(time.time() - last, 2)  # the rest until exit is measured by the parent
        return out


def timeline() -> Timeline:
    """A Timeline that sees every record any logger handles. Prefect reconfigures logging when
    its server and flows start (a handler added to a logger is dropped), so this wraps
    ``Logger.handle`` itself: for a benchmark only."""
    tl = Timeline()
    handle = logging.Logger.handle

    def handle_and_record(logger: logging.Logger, record: logging.LogRecord) -> None:
        tl.emit(record)
        handle(logger, record)

    logging.Logger.handle = handle_and_record
    logging.getLogger("pipeline").setLevel(logging.INFO)  # the launcher's "launching:" line
    return tl


def child_direct(preset: str, overrides: list[str], root: str) -> dict:
    from pipeline.config_sources import load_run_config
    from pipeline.model.evaluate import perplexity
    from pipeline.model.generate import generate
    from pipeline.training.launch import launch_training
    from pipeline.model.models import build_model
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.tokenizer import tokenize
    import torch

    tl = timeline()
    tl.mark("imported")
    cfg = load_run_config(preset, overrides)
    t0 = time.perf_counter()
    ds = prepare_dataset(cfg.data, root)
    t_data = time.perf_counter() - t0
    tl.mark("dataset ready")
    run_dir = os.path.join(root, "runs", "direct")
    launched = launch_training(run_dir, ds.uri, cfg, on_line=lambda line: tl.mark(f"trainer: {line}"))
    tl.mark("trainer done")
    t_train = time.perf_counter() - t0 - t_data
    model = build_model(cfg.model, ds.vocab_size)
    model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt"), weights_only=True))
    ppl = {s: perplexity(model, ds.split(s), batch_size=cfg.train.batch_size, num_steps=cfg.train.num_steps) for s in ("val", "test")}
    for i, prefix in enumerate(("time traveller", "the time machine")):
        generate(model, list(ds.vocab.tokens), tokenize(prefix, cfg.data.tokenizer), 100, temperature=0.7, seed=i)
    tl.mark("evaluated")
    return {"data_s": t_data, "train_s": t_train, "trainer_wall_s": (launched.result or {}).get("wall_s"), **ppl,
            "stages": tl.stages(DIRECT_MILESTONES)}


def child_flow(preset: str, overrides: list[str], root: str) -> dict:
    from flows.main import run_main

    # MLflow registration is pipeline work the direct side does not do: leave it out so the
    # difference is orchestration (Prefect start-up, task state, caching, result persistence).
    tl = timeline()
    s = run_main(preset, root=root, overrides=overrides, options={"register_model": False}, print_summary=False)
    return {"cached_stages": s["cached_stages"], "total_stages": s["total_stages"], "val": s["val_ppl"],
            "test": s["test_ppl"], "trainer_wall_s": s["train_wall_s"], "stages": tl.stages(FLOW_MILESTONES)}


def print_stages(label: str, wall_s: float, stages: dict[str, float]) -> None:
    """One line per stage; what is left of the parent's wall time is interpreter start and exit."""
    print(f"{label} ({wall_s:.1f} s):", file=sys.stderr)
    for name, seconds in stages.items():
        print(f"  {name:<42} {seconds:7.2f} s", file=sys.stderr)
    print(f"  {'(interpreter exit, unaccounted)':<42} {wall_s - sum(stages.values()):7.2f} s", file=sys.stderr)


def timed_child(mode: str, preset: str, overrides: list[str], root: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--preset", preset, "--root", root,
           "--overrides-json", json.dumps(overrides)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{mode} run failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH_RESULT "))
    return wall, json.loads(line[len("BENCH_RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="timemachine-char")
    p.add_argument("--epochs", type=int, default=0, help="epochs of the full run (default: calibrated to ~2 minutes)")
    p.add_argument("--short", action="store_true", help="a ~10 s training on a 20k-token slice")
    p.add_argument("--child", choices=["direct", "flow"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--overrides-json", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        fn = child_direct if args.child == "direct" else child_flow
        out = fn(args.preset, json.loads(args.overrides_json), args.root)
        print("BENCH_RESULT " + json.dumps(out), flush=True)
        return

    work = tempfile.mkdtemp(prefix="rnnlm-bench-")
    if not args.short and not args.epochs:
        # calibrate: one epoch directly, then enough epochs for ~2 minutes of training
        _, probe = timed_child("direct", args.preset, ["train.epochs=1", "train.max_minutes=null"], os.path.join(work, "probe"))
        args.epochs = max(1, round(120 / max(probe["trainer_wall_s"] or probe["train_s"], 1e-3)))
        print(f"calibration: one epoch takes {probe['trainer_wall_s']:.1f} s -> {args.epochs} epochs", file=sys.stderr)
    overrides = overrides_for(args)

    direct_s, direct = timed_child("direct", args.preset, overrides, os.path.join(work, "direct"))
    print(f"direct: {direct_s:.1f} s (data {direct['data_s']:.1f} s, training {direct['train_s']:.1f} s)", file=sys.stderr)
    flow_s, flow = timed_child("flow", args.preset, overrides, os.path.join(work, "flow"))
    print(f"flow:   {flow_s:.1f} s", file=sys.stderr)
    cached_s, cached = timed_child("flow", args.preset, overrides, os.path.join(work, "flow"))
    print(f"cached: {cached_s:.1f} s ({cached['cached_stages']}/{cached['total_stages']} stages cached)", file=sys.stderr)

    print_stages("direct", direct_s, direct["stages"])
    print_stages("flow", flow_s, flow["stages"])
    print_stages("cached", cached_s, cached["stages"])
    train_s = direct["train_s"]
    overhead = flow_s - direct_s
    budget = 0.10 * train_s + 15.0
    print(json.dumps({
        "preset": args.preset, "overrides": overrides,
        "flow_s": round(flow_s, 2), "direct_s": round(direct_s, 2), "overhead_s": round(overhead, 2),
        "cached_rerun_s": round(cached_s, 2), "direct_train_s": round(train_s, 2),
        "overhead_budget_s": round(budget, 2), "overhead_ok": overhead <= budget, "cached_ok": cached_s <= 20.0,
        "cached_stages": f"{cached['cached_stages']}/{cached['total_stages']}",
        "val_ppl": {"direct": direct["val"], "flow": flow["val"]}, "work_dir": work,
        "stages_s": {"direct": direct["stages"], "flow": flow["stages"], "cached": cached["stages"]},
    }))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
