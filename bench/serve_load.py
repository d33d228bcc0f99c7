"""The served model under concurrent clients, against calling ``predict`` in-process.

    .venv/bin/python bench/serve_load.py                      # builds a small champion in a temp root
    .venv/bin/python bench/serve_load.py --requests 32        # fewer requests per round
    MLFLOW_TRACKING_URI=sqlite:///$PWD/.rnnlm/mlflow.db \\
        .venv/bin/python bench/serve_load.py --model models:/rnnlm-timemachine-char@champion

Without ``--model`` it trains the ``timemachine-char`` preset's model (the GRU of 512) for one
epoch on 12k characters into a temporary storage root, registers it and makes it the champion:
the architecture, and so the cost of a token, are the preset's. Then ``mlflow models serve`` of
the champion on 127.0.0.1 (``--server-workers`` processes) and, for requests of 1 and 16
prefixes x 50 tokens (sampled, a seed per request), rounds of 1, 8 and 32 concurrent clients on
loopback, each round bounded by ``--requests`` in all and ``--round-seconds``. Every answer is
compared with what the same model gives in this process; a wrong answer or a non-200 counts
as an error. Figures: prefixes/s, tokens/s, p50/p99 latency, the server's RSS (all its
processes). In-process: ``predict`` on the same requests one after another, and
``batch32_over_single``, the time of 32 prefixes x 100 tokens (greedy) in one ``predict`` over
the time of one prefix (median of ``--repeats``), at ``--threads`` and at all the cores, beside
``step32_over_step1``, the model's own one-token step at 32 rows over 1 row: the floor of that
ratio, since a batch of 32 does 32 times the multiply-adds. The JSON's top-level batching
figures are at all the cores. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.servers starts (and stops) the server by PID

NUM_TOKENS = 50
SHAPES = (1, 16)  # prefixes per request
CONCURRENCY = (1, 8, 32)
TEXT = ("the time traveller for so it will be convenient to speak of him was expounding a recondite matter "
        "to us his grey eyes shone and twinkled and his usually pale face was flushed and animated the fire "
        "burned brightly and the soft radiance of the incandescent lights in the lilies of silver caught the bubbles")
WORDS = TEXT.split()


def prefixes_for(request: int, count: int) -> list[str]:
    """``count`` prefixes of 1-8 words, different for each request number."""
    return [" ".join(WORDS[(request * 7 + i * 3) % 40:][:1 + (request + i) % 8]) for i in range(count)]


def request_body(request: int, count: int) -> dict:
    return {"inputs": prefixes_for(request, count),
            "params": {"num_tokens": NUM_TOKENS, "temperature": 0.8, "top_k": 5, "seed": request}}


def build_champion(root: str) -> str:
    """Train the timemachine-char preset's model briefly, register it, make it the champion."""
    from pipeline.config_sources import load_run_config
    from pipeline.data.prepare import prepare_dataset
    from pipeline.model.lm import write_lm_metadata
    from pipeline.registry import gate, packaging, run_logging
    from pipeline.training.train import train

    cfg = load_run_config("timemachine-char", ["data.splits.max_tokens=12000", "train.epochs=1",
                                               "train.device=cpu", "train.max_minutes=null"])
    dataset = prepare_dataset(cfg.data, root)
    run_dir = os.path.join(root, "runs", "bench-serve")
    train(dataset.split("train"), dataset.split("val"), dataset.vocab_size, cfg.model, cfg.train, run_dir)
    write_lm_metadata(run_dir, dataset)
    run_id = run_logging.log_training_run(run_dir, dataset, preset="timemachine-char", config=cfg, root=root)
    mv = packaging.register_model(run_id, run_dir, preset="timemachine-char", root=root)
    gate.promote_if_better(mv.name, mv.version, dataset, root=root)
    return f"models:/{mv.name}@{packaging.CHAMPION}"


def post(url: str, body: dict, timeout: float) -> tuple[int, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:200]
    except OSError as e:  # refused, reset, timed out
        return 0, repr(e)


def server_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def run_round(url: str, count: int, clients: int, expected: dict, args, server_pid: int) -> dict:
    """``clients`` threads send requests of ``count`` prefixes until ``args.requests`` are sent
    or ``args.round_seconds`` pass; latencies of each, errors (non-200 or a wrong answer)."""
    lock, issued = threading.Lock(), [0]
    latencies, errors = [], []
    deadline = time.monotonic() + args.round_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= args.requests:
                    return
                n = issued[0]
                issued[0] += 1
            key = (count, n % args.distinct)
            started = time.perf_counter()
            status, body = post(url, request_body(n % args.distinct, count), args.round_seconds)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if status != 200 or body != {"predictions": expected[key]}:
                    errors.append((status, str(body)[:200]))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - started
    done = len(latencies) - len(errors)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {"prefixes": count, "clients": clients, "requests": len(latencies), "errors": len(errors),
            "error_sample": errors[:2], "p50_ms": round(p50 * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "p99_over_p50": round(p99 / p50, 2), "prefixes_per_s": round(done * count / wall, 1),
            "tokens_per_s": round(done * count * NUM_TOKENS / wall), "server_rss_mb": round(server_rss_mb(server_pid))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def model_steps(model, rows: int, steps: int) -> None:
    """``steps`` one-token steps of ``rows`` rows through the model, as generation takes them."""
    import torch

    ids = torch.ones(rows, 1, dtype=torch.long)
    with torch.no_grad():
        state = None
        for _ in range(steps):
            logits, state = model(ids, state, last_only=True)
            ids = logits[:, -1].argmax(dim=-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model URI to serve (default: build a small champion)")
    parser.add_argument("--requests", type=int, default=64, help="requests per round, all clients together")
    parser.add_argument("--round-seconds", type=float, default=120.0, help="a round sends nothing new after this")
    parser.add_argument("--distinct", type=int, default=16, help="distinct requests per shape (answers checked)")
    parser.add_argument("--server-workers", type=int, default=1, help="mlflow models serve -w")
    parser.add_argument("--repeats", type=int, default=5, help="in-process timings: the median of this many")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, here and in the server (OMP_NUM_THREADS); default 1: on a shared "
                             "host two OpenMP threads wait on each other")
    parser.add_argument("--build-champion", metavar="ROOT", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_champion:  # the child that trains: training leaves its thread settings in a process
        print(build_champion(args.build_champion))
        return

    import mlflow
    import torch

    from flows.servers import TELEMETRY_OFF
    from pipeline.registry.tracking import tracking_uri, using_tracking
    from tests.servers import Processes, free_port, wait_http

    os.environ.update(TELEMETRY_OFF)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = None if args.model else os.path.join(tmp, "store")
        if args.model:
            uri = args.model
        else:
            import subprocess

            built = subprocess.run([sys.executable, __file__, "--build-champion", root], capture_output=True, text=True)
            if built.returncode != 0:
                sys.exit(f"building the champion failed:\n{built.stderr[-3000:]}")
            uri = built.stdout.strip().splitlines()[-1]
        with using_tracking(root):
            model = mlflow.pyfunc.load_model(uri)

        # In-process: the answers every served request must match, and the figures to compare with.
        def predict(body: dict) -> list[str]:
            return model.predict(body["inputs"], params=body["params"])

        expected = {(count, r): predict(request_body(r, count)) for count in SHAPES for r in range(args.distinct)}
        in_process = {}
        for count in SHAPES:
            n = max(4, args.requests // 4)
            wall = timed(lambda: [predict(request_body(r % args.distinct, count)) for r in range(n)], 1)
            in_process[count] = {"requests": n, "ms_per_request": round(wall / n * 1000, 1),
                                 "prefixes_per_s": round(n * count / wall, 1)}
        greedy100 = {"num_tokens": 100}
        prefixes32 = prefixes_for(0, 32)
        rnnlm = model.unwrap_python_model().lm.model
        batching = {}
        # The in-process figures at the server's threads and at all the cores (what a process that
        # loads the model gets by default), with the model's own step at 32 rows over 1 row: the
        # arithmetic floor of batch32_over_single (32 rows are 32x the multiply-adds of one).
        for threads in sorted({args.threads, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            single = timed(lambda: model.predict(prefixes32[:1], params=greedy100), args.repeats)
            batch32 = timed(lambda: model.predict(prefixes32, params=greedy100), args.repeats)
            one_by_one = timed(lambda: [model.predict([p], params=greedy100) for p in prefixes32],
                               max(1, args.repeats // 2))
            step32 = timed(lambda: model_steps(rnnlm, 32, 100), args.repeats)
            step1 = timed(lambda: model_steps(rnnlm, 1, 100), args.repeats)
            batching[threads] = {"single_ms": round(single * 1000, 1), "batch32_ms": round(batch32 * 1000, 1),
                                 "sequential32_ms": round(one_by_one * 1000, 1),
                                 "batch32_over_single": round(batch32 / single, 2),
                                 "sequential32_over_single": round(one_by_one / single, 2),
                                 "step32_over_step1": round(step32 / step1, 2)}
        torch.set_num_threads(args.threads)

        procs = Processes(Path(tmp) / "logs")
        try:
            port = free_port()
            env = {**os.environ, **TELEMETRY_OFF, "MLFLOW_TRACKING_URI": tracking_uri(root),
                   "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
            env.pop("PYTHONPATH", None)
            server = procs.start("serve", [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", uri,
                                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                                           "-w", str(args.server_workers)], env=env, cwd=tmp)
            wait_http(f"http://127.0.0.1:{port}/ping", server, procs, "serve", timeout=300)
            rss_idle = server_rss_mb(server.pid)
            rounds = [run_round(f"http://127.0.0.1:{port}/invocations", count, clients, expected, args, server.pid)
                      for count in SHAPES for clients in CONCURRENCY]
        finally:
            procs.stop_all()

    print(f"model {uri}; {NUM_TOKENS} tokens a prefix, sampled; {args.threads} torch thread(s); server: "
          f"{args.server_workers} worker(s), RSS {rss_idle:.0f} MB idle")
    print(f"{'prefixes':>8} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
          f"{'prefixes/s':>10} {'tokens/s':>8} {'RSS MB':>6}")
    for r in rounds:
        print(f"{r['prefixes']:>8} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['p50_ms']:>8} "
              f"{r['p99_ms']:>8} {r['p99_over_p50']:>7} {r['prefixes_per_s']:>10} {r['tokens_per_s']:>8} "
              f"{r['server_rss_mb']:>6}")
        for status, body in r["error_sample"]:
            print(f"    error: {status} {body}")
    for count, row in in_process.items():
        print(f"in-process predict, {count} prefix(es) a request, one after another: {row['ms_per_request']} ms a "
              f"request, {row['prefixes_per_s']} prefixes/s")
    for threads, b in batching.items():
        print(f"in-process, 100 tokens greedy, {threads} thread(s): 1 prefix {b['single_ms']} ms; 32 prefixes in one "
              f"predict {b['batch32_ms']} ms ({b['batch32_over_single']}x); 32 predicts of one prefix "
              f"{b['sequential32_ms']} ms ({b['sequential32_over_single']}x); the model's step at 32 rows over "
              f"1 row {b['step32_over_step1']}x (the floor of the batch's ratio)")

    def per_concurrency(key: str) -> dict:
        return {str(c): {str(r["prefixes"]): r[key] for r in rounds if r["clients"] == c} for c in CONCURRENCY}

    print(json.dumps({
        "bench": "serve_load", "num_tokens": NUM_TOKENS, "server_workers": args.server_workers, "threads": args.threads,
        "batch32_over_single": batching[max(batching)]["batch32_over_single"],
        "step32_over_step1": batching[max(batching)]["step32_over_step1"],
        "batching_by_threads": {str(t): b for t, b in batching.items()},
        "p50_ms": per_concurrency("p50_ms"), "p99_ms": per_concurrency("p99_ms"),
        "errors": per_concurrency("errors"), "prefixes_per_s": per_concurrency("prefixes_per_s"),
        "tokens_per_s": per_concurrency("tokens_per_s"),
        "in_process_prefixes_per_s": {str(c): row["prefixes_per_s"] for c, row in in_process.items()},
        "server_rss_mb": {"idle": round(rss_idle), "max": max(r["server_rss_mb"] for r in rounds)},
    }))


if __name__ == "__main__":
    main()
