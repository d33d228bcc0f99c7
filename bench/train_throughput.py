"""Training throughput: pipeline.training.train against plain PyTorch, d2l, itself in bf16, and a neighbour.

Sections (``--sections``, all by default; each runs in subprocesses of its own):

* ``trainer``: for each model, one process (or one torchrun job) trains it twice on the same
  sequential batches: ``plain``, nn.Embedding + nn.RNN/GRU/LSTM + nn.Linear in a dozen lines
  (DDP-wrapped on 2 ranks), and ``trainer``, ``pipeline.training.train.train`` with everything it does
  per step. One warm-up and one timed epoch of ``--steps`` steps each, interleaved
  ``--repeats`` times, best of each kept; tokens/s is global (all ranks); the trainer's figure
  is its own epoch-2 ``tokens_per_s`` (validation and checkpoints fall outside that window).
  ``--models d2l`` is d2l's settings (batch 32 x 35, hidden 256, vocab 28, SGD lr 1, clip 1)
  for rnn/gru/lstm x ``--layers`` x ``--ranks``; ``presets`` each bundled preset's model;
  ``ptb-medium`` a 2 x 650 LSTM, vocab 10k, batch 20 x 35. Both loops run the trainer's default
  matmul precision (TF32 on a GPU). Target ratio >= 0.95 (CPU).
* ``graphs`` (CUDA only): the trainer with ``train.cuda_graphs: true`` over the plain loop, the
  ``trainer`` section's models on one rank. Target >= 1.3 on the d2l rows.
* ``bf16``: the trainer at ``train.precision: bf16`` over fp32, d2l's GRU, on the CPU.
* ``peers``: d2l 0.17.6's own ``train_epoch_ch8`` against the trainer, epoch by epoch in
  ``--peer-rounds`` paired rounds, the median ratio (bench/throughput_peers.py).
* ``softmax``: adaptive vs full softmax at vocabularies 10k/50k/250k (bench/throughput_softmax.py).
* ``shared``: tokens/s beside a process using 20% of one core, and alone, for each OpenMP waiting
  behaviour, over the best alone (bench/throughput_shared_host.py).
* ``ray``: 2 Ray Train workers vs ``torchrun --nproc-per-node 2`` on this machine, tokens/s over
  epochs of ``--ray-steps`` steps (the steady state, not Ray's start-up) and the Ray launch's
  start-up seconds (bench/throughput_ray.py; skipped without the ``ray`` extra).

Prints tables, then one JSON line: the rows of every section, ``ratio_min`` (trainer over
plain), ``graphs_ratio_min``, ``peer_ratio_min``, ``bf16_cpu_ratio``, ``adaptive_speedup_250k``,
``shared_host_ratio``, ``quiet_host_ratio``, ``ray_ratio`` and ``ray_startup_s`` (null for a
section not run).

    python bench/train_throughput.py --sections trainer --steps 20 --cells gru --layers 1 --ranks 1,2
    python bench/train_throughput.py --device cuda --sections trainer,softmax --models d2l,presets,ptb-medium
    python bench/train_throughput.py --sections ray --ray-steps 400 --repeats 3 --device cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTIONS = ("trainer", "graphs", "bf16", "peers", "softmax", "shared", "ray")


@dataclass(frozen=True)
class Spec:
    """One model and loop, built identically by the plain loop and the trainer."""

    name: str
    cell: str = "gru"
    layers: int = 1
    hidden: int = 256
    vocab: int = 28
    embed: int | None = None  # None: vocabulary-wide (d2l's one-hot input)
    batch: int = 32
    num_steps: int = 35
    optimizer: str = "sgd"
    lr: float = 1.0
    dropout: float = 0.0
    precision: str = "fp32"
    baseline: str = "plain"  # or "trainer-fp32": the trainer itself at fp32
    cuda_graphs: bool = False  # the trainer's step replayed as a CUDA graph

    def model_config(self):
        from pipeline.config import ModelConfig

        return ModelConfig(cell=self.cell, hidden_size=self.hidden, num_layers=self.layers,
                           embed_size=self.embed, dropout=self.dropout)

    def train_config(self, device: str, precision: str | None = None):
        from pipeline.config import TrainConfig

        return TrainConfig(batch_size=self.batch, num_steps=self.num_steps, epochs=2, optimizer=self.optimizer,
                           lr=self.lr, clip_norm=1.0, device=device, precision=precision or self.precision,
                           cuda_graphs=self.cuda_graphs)


def plain_loop(spec: Spec, ids, steps: int, init_state: dict, d) -> float:
    """The baseline: what one would write by hand. Returns tokens/s of the second epoch."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    class PlainLM(nn.Module):
        def __init__(self):
            super().__init__()
            embed = spec.embed or spec.vocab
            self.embedding = nn.Embedding(spec.vocab, embed)
            self.embedding.weight.requires_grad_(spec.embed is not None)  # None: one-hot, as the trainer's
            self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[spec.cell](
                embed, spec.hidden, spec.layers, batch_first=True, dropout=spec.dropout if spec.layers > 1 else 0.0)
            self.dropout = nn.Dropout(spec.dropout)
            self.output = nn.Linear(spec.hidden, spec.vocab)

        def forward(self, X, state):
            out, state = self.rnn(self.embedding(X), state)
            return self.output(self.dropout(out)), state

    model = PlainLM().to(d.device)
    model.load_state_dict(init_state)  # same init as the trainer's model (same parameter names)
    net = nn.parallel.DistributedDataParallel(model) if d.distributed else model
    opt = (torch.optim.SGD(model.parameters(), lr=spec.lr) if spec.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=spec.lr))
    rows = spec.batch // d.world_size  # d2l's sequential partition, this rank's rows
    corpus = torch.from_numpy(ids).long().to(d.device)
    n = steps * spec.num_steps
    Xs = corpus[: spec.batch * n].reshape(spec.batch, n)[d.rank * rows:(d.rank + 1) * rows]
    Ys = corpus[1: spec.batch * n + 1].reshape(spec.batch, n)[d.rank * rows:(d.rank + 1) * rows]

    def epoch() -> float:
        if d.distributed:
            dist.barrier()
        start, state, total = time.perf_counter(), None, torch.zeros((), device=d.device)
        for i in range(0, n, spec.num_steps):
            X, Y = Xs[:, i:i + spec.num_steps], Ys[:, i:i + spec.num_steps]
            if state is not None:
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            logits, state = net(X, state)
            loss = F.cross_entropy(logits.reshape(-1, spec.vocab), Y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.detach()
        total.item()  # wait for the device
        return spec.batch * n / (time.perf_counter() - start)

    epoch()
    return epoch()


def trainer_epoch(spec: Spec, train_ids, val_ids, run_dir: Path, device: str, d, precision=None) -> float:
    """pipeline.training.train.train for two epochs; the second epoch's tokens/s (rank 0; 0 elsewhere)."""
    from pipeline.training.train import train

    train(train_ids, val_ids, spec.vocab, spec.model_config(), spec.train_config(device, precision),
          str(run_dir), dist_info=d)
    if not d.is_main:
        return 0.0
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]


def worker(args) -> None:
    """Runs inside each rank: every spec, baseline then trainer, interleaved."""
    import numpy as np
    import torch

    from pipeline.config import TrainConfig
    from pipeline.model.models import build_model
    from pipeline.training.distributed import setup_distributed
    from pipeline.training.precision import set_matmul_precision

    d = setup_distributed(args.device)
    # Both loops at the trainer's default matmul precision (TF32 on a GPU); the trainer sets it
    # anyway, and a setting left over from its first run must not change the plain loop's after it.
    set_matmul_precision(TrainConfig().tf32, d.device)
    for spec in (Spec(**s) for s in json.loads(args.specs)):
        tokens = args.steps * spec.batch * spec.num_steps + spec.num_steps  # exactly --steps batches
        ids = np.random.default_rng(0).integers(0, spec.vocab, tokens + 2_000).astype(np.int32)
        train_ids, val_ids = ids[:tokens], ids[tokens:]
        torch.manual_seed(0)
        init = build_model(spec.model_config(), spec.vocab).state_dict()
        base, ours = 0.0, 0.0
        for rep in range(args.repeats):  # interleaved, best of each: the load on shared machines varies
            run = Path(args.workdir) / f"{spec.name}-{d.world_size}-{rep}"
            if spec.baseline == "plain":
                base = max(base, plain_loop(spec, train_ids, args.steps, init, d))
            else:
                base = max(base, trainer_epoch(spec, train_ids, val_ids, run.with_name(run.name + "-fp32"),
                                               args.device, d, precision="fp32"))
            ours = max(ours, trainer_epoch(spec, train_ids, val_ids, run, args.device, d))
        if d.is_main:
            row = {"model": spec.name, "ranks": d.world_size, "precision": spec.precision,
                   "tokens_per_s": round(ours), "baseline": spec.baseline,
                   "baseline_tokens_per_s": round(base), "ratio": round(ours / base, 3)}
            print("BENCH " + json.dumps(row), flush=True)


def preset_specs() -> list[Spec]:
    """Each bundled preset's model and batch shape (the vocabulary from its prepared data)."""
    from pipeline.config_sources import load_run_config, preset_names
    from pipeline.data.prepare import prepare_dataset

    specs = []
    with tempfile.TemporaryDirectory() as store:
        for name in preset_names():
            cfg = load_run_config(name)
            vocab = prepare_dataset(cfg.data, store).vocab_size
            m, t = cfg.model, cfg.train
            specs.append(Spec(name, m.cell, m.num_layers, m.hidden_size, vocab, m.embed_size, t.batch_size,
                              t.num_steps, t.optimizer, t.lr, m.dropout))
    return specs


def specs_for(args) -> list[Spec]:
    specs: list[Spec] = []
    for group in args.models.split(","):
        if group == "d2l":
            specs += [Spec(f"d2l-{cell}-{layers}", cell, layers)
                      for cell in args.cells.split(",") for layers in (int(x) for x in args.layers.split(","))]
        elif group == "presets":
            specs += preset_specs()
        elif group == "ptb-medium":
            specs.append(Spec("ptb-medium", "lstm", 2, 650, 10_000, 650, 20, 35))
        else:
            sys.exit(f"unknown --models group {group!r}: d2l, presets, ptb-medium")
    return specs


def run_workers(args, specs: list[Spec], ranks_list: list[int]) -> list[dict]:
    rows = []
    from pipeline.training.launch import trainer_env

    with tempfile.TemporaryDirectory() as workdir:
        for ranks in ranks_list:
            # OpenMP's waiting as the launcher sets it for the trainer (both sides of a row share it)
            env = trainer_env({"PYTHONPATH": str(REPO)}, nproc=ranks)
            launcher = [sys.executable] if ranks == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            cmd = [*launcher, __file__, "--worker", "--workdir", workdir, "--steps", str(args.steps),
                   "--device", args.device, "--repeats", str(args.repeats),
                   "--specs", json.dumps([asdict(s) for s in specs])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"worker failed ({ranks} ranks):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows += [json.loads(line[len("BENCH "):]) for line in proc.stdout.splitlines()
                     if line.startswith("BENCH ")]
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{title}")
    keys = list(rows[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>14,}" if isinstance(r[k], (int, float)) else f"{str(r[k]):>14}" for k in keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=50, help="steps per epoch (one warm-up + one timed epoch)")
    p.add_argument("--models", default="d2l", help="trainer section: d2l, presets, ptb-medium (comma-separated)")
    p.add_argument("--cells", default="rnn,gru,lstm")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--ranks", default="1,2", help="world sizes to run, e.g. 1,2")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best of each counts")
    p.add_argument("--peer-rounds", type=int, default=40,
                   help="peers section: paired rounds (one d2l epoch and one trainer epoch each) per model")
    p.add_argument("--softmax-vocabs", default="10000,50000,250000", help="softmax section: vocabulary sizes")
    p.add_argument("--ray-address", default="local", help="ray section: local (a private Ray), auto or ray://...")
    p.add_argument("--ray-steps", type=int, default=400,
                   help="ray section: steps per epoch (400: ~13 s on 2 cores, past Ray's start-up transients)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--specs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        sys.exit(f"unknown --sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    out: dict = {}

    if "trainer" in sections:
        rows = run_workers(args, specs_for(args), [int(r) for r in args.ranks.split(",")])
        print_rows("trainer vs plain PyTorch", rows)
        out.update(rows=rows, ratio_min=min(r["ratio"] for r in rows))
    if "graphs" in sections:
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            print("\ngraphs: skipped (needs CUDA)")
        else:
            specs = [replace(spec, name=spec.name + "-graphs", cuda_graphs=True) for spec in specs_for(args)]
            rows = run_workers(args, specs, [1])
            print_rows("trainer with cuda_graphs vs plain PyTorch", rows)
            out.update(graphs_rows=rows, graphs_ratio_min=min(r["ratio"] for r in rows))
    if "bf16" in sections:
        spec = Spec("d2l-gru-1-bf16", precision="bf16", baseline="trainer-fp32")
        rows = run_workers(_cpu(args), [spec], [1])
        print_rows("trainer bf16 vs fp32 (CPU)", rows)
        out.update(bf16_rows=rows, bf16_cpu_ratio=rows[0]["ratio"])
    if "peers" in sections:
        from bench.throughput_peers import peer_rows

        rows = peer_rows(REPO, rounds=args.peer_rounds)
        print_rows("trainer vs d2l 0.17.6 train_epoch_ch8 (first 10,000 chars, batch 32 x 35)", rows)
        out.update(peer_rows=rows, peer_ratio_min=min(r["ratio"] for r in rows))
    if "softmax" in sections:
        from bench.throughput_softmax import softmax_rows

        rows = softmax_rows(REPO, device=args.device, vocabs=[int(v) for v in args.softmax_vocabs.split(",")])
        print_rows("adaptive vs full softmax", rows)
        out.update(softmax_rows=rows, adaptive_speedup_250k=next(
            (r["speedup"] for r in rows if r["vocab"] == 250_000), None))
    if "shared" in sections:
        from bench.throughput_shared_host import shared_host_rows

        rows, ratio, quiet = shared_host_rows(REPO, repeats=args.repeats)
        print_rows("beside a neighbour using 20% of one core, and alone (over the best alone)", rows)
        out.update(shared_host_rows=rows, shared_host_ratio=ratio, quiet_host_ratio=quiet)
    if "ray" in sections:
        from bench.throughput_ray import ray_section

        out.update(ray_section(REPO, args, print_rows))
    for key in ("ratio_min", "graphs_ratio_min", "peer_ratio_min", "bf16_cpu_ratio", "adaptive_speedup_250k",
                "shared_host_ratio", "quiet_host_ratio", "ray_ratio", "ray_startup_s"):
        out.setdefault(key, None)
    print(json.dumps(out))


def _cpu(args):
    return argparse.Namespace(**{**vars(args), "device": "cpu"})


if __name__ == "__main__":
    main()
