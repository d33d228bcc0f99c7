"""Peer rows: d2l 0.17.6's own ``train_epoch_ch8`` against ``pipeline.training.train`` on the same model and data.

d2l is installed with ``pip install --no-deps --target <tmp> d2l==0.17.6``; the modules it
imports only for plotting and image data (IPython, matplotlib_inline, torchvision) are stubbed,
and its ``read_time_machine`` reads the bundled copy instead of downloading. Data: the first
10,000 characters of the Time Machine (d2l's ``max_tokens=10000``), batch 32 x 35, sequential.
Models (hidden 256, one-hot input, SGD lr 1, clipping at 1): nn.RNN, nn.GRU, 2-layer nn.LSTM
through ``d2l.RNNModel``, and the book's scratch RNN (sec. 8.5, ``d2l.RNNModelScratch``)
against ``backend: scratch``.

An epoch here is ~8 steps, 0.1-0.3 s, and this machine's speed drifts by tens of percent
within seconds, so the two sides are paired: each of ``rounds`` rounds trains one d2l epoch
and one trainer epoch, in a random order, and the row's ratio is the median of the rounds'
ratios (after 2 warm-up rounds). The trainer's epoch is the body of ``pipeline.training.train``'s
own loop (``_train_epoch``, which ends in validation, metrics line, checkpoint) on a
run from ``start_run``; its figure is the epoch's ``tokens_per_s``, as metrics.jsonl has it.
(Restarting ``train()`` for every round instead costs its timed epochs ~3% here: a real run
does not restart every epoch.) Both sides count the same tokens: batch x num_steps per step.
Target: ratio (trainer over d2l) >= 1.0 for each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

D2L = "d2l==0.17.6"
WARMUP_ROUNDS = 2
HIDDEN, BATCH, NUM_STEPS, MAX_TOKENS = 256, 32, 35, 10_000
MODELS = {"rnn": ("rnn", 1, "torch"), "gru": ("gru", 1, "torch"), "lstm-2": ("lstm", 2, "torch"),
          "scratch-rnn": ("rnn", 1, "scratch")}


def install_d2l(target: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, D2L],
                   check=True)


def import_d2l(target: str):
    """d2l.torch with its plotting-only imports stubbed and the corpus read from the bundled file."""
    for name in ("IPython", "IPython.display", "matplotlib_inline", "matplotlib_inline.backend_inline",
                 "torchvision", "torchvision.transforms"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["IPython"].display = sys.modules["IPython.display"]
    sys.modules["matplotlib_inline"].backend_inline = sys.modules["matplotlib_inline.backend_inline"]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.path.insert(0, target)
    from d2l import torch as d2l

    import re
    from importlib import resources

    def read_time_machine():  # d2l's own, minus the download
        text = (resources.files("pipeline") / "data" / "timemachine.txt").read_text(encoding="utf-8")
        return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.splitlines(keepends=True)]

    d2l.read_time_machine = read_time_machine
    return d2l


def scratch_rnn_fns(torch):
    """The book's sec. 8.5 scratch RNN, verbatim (these are notebook code, not in the package)."""
    def get_params(vocab_size, num_hiddens, device):
        num_inputs = num_outputs = vocab_size

        def normal(shape):
            return torch.randn(size=shape, device=device) * 0.01
        W_xh, W_hh = normal((num_inputs, num_hiddens)), normal((num_hiddens, num_hiddens))
        b_h = torch.zeros(num_hiddens, device=device)
        W_hq, b_q = normal((num_hiddens, num_outputs)), torch.zeros(num_outputs, device=device)
        params = [W_xh, W_hh, b_h, W_hq, b_q]
        for param in params:
            param.requires_grad_(True)
        return params

    def init_rnn_state(batch_size, num_hiddens, device):
        return (torch.zeros((batch_size, num_hiddens), device=device),)

    def rnn(inputs, state, params):
        W_xh, W_hh, b_h, W_hq, b_q = params
        H, = state
        outputs = []
        for X in inputs:
            H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
            outputs.append(torch.mm(H, W_hq) + b_q)
        return torch.cat(outputs, dim=0), (H,)
    return get_params, init_rnn_state, rnn


def d2l_epochs(d2l, name: str, train_iter, vocab_size: int):
    """A function that trains d2l's model for one more epoch with ``train_epoch_ch8``; returns its tokens/s."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    cell, layers, backend = MODELS[name]
    device = torch.device("cpu")
    if backend == "scratch":
        net = d2l.RNNModelScratch(vocab_size, HIDDEN, device, *scratch_rnn_fns(torch))
        updater = lambda batch_size: d2l.sgd(net.params, 1.0, batch_size)  # noqa: E731 (the book's)
    else:
        layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](vocab_size, HIDDEN, layers)
        net = d2l.RNNModel(layer, vocab_size).to(device)
        updater = torch.optim.SGD(net.parameters(), 1.0)
    loss = nn.CrossEntropyLoss()
    return lambda: d2l.train_epoch_ch8(net, train_iter, loss, updater, device, False)[1]


def trainer_epochs(name: str, corpus, vocab_size: int, run_dir: str, d):
    """A function that runs one more epoch of the trainer's loop; returns that epoch's tokens/s."""
    import numpy as np

    from pipeline.training import train as trainer
    from pipeline.training.metrics import read_epochs
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.training.run_state import start_run

    cell, layers, backend = MODELS[name]
    ids = np.asarray(corpus, dtype=np.int32)
    run = start_run(ids, ids[:1000], vocab_size,
                    ModelConfig(cell=cell, num_layers=layers, hidden_size=HIDDEN, backend=backend),
                    TrainConfig(batch_size=BATCH, num_steps=NUM_STEPS, sampling="sequential", epochs=10**6,
                                optimizer="sgd", lr=1.0, clip_norm=1.0, device="cpu", keep_best=False),
                    run_dir, f"{run_dir}/checkpoints", d)
    trainer._resume(run)

    def epoch() -> float:  # the body of trainer._train's loop
        trainer._train_epoch(run)
        return read_epochs(run_dir)[-1]["tokens_per_s"]
    return epoch


def child(target: str, workdir: str, rounds: int) -> None:
    import random
    import statistics

    from pipeline.training.distributed import setup_distributed

    d2l = import_d2l(target)
    d = setup_distributed("cpu")  # the trainer's threads, as train() sets them
    train_iter, vocab = d2l.load_data_time_machine(BATCH, NUM_STEPS, False, MAX_TOKENS)
    order = random.Random(0)
    for name in MODELS:
        sides = {"d2l": d2l_epochs(d2l, name, train_iter, len(vocab)),
                 "trainer": trainer_epochs(name, train_iter.corpus, len(vocab), f"{workdir}/{name}", d)}
        speeds = {"d2l": [], "trainer": []}
        for _ in range(WARMUP_ROUNDS + rounds):
            for side in order.sample(list(sides), 2):
                speeds[side].append(sides[side]())
        theirs, ours = (speeds[side][WARMUP_ROUNDS:] for side in ("d2l", "trainer"))
        print("PEER " + json.dumps({
            "model": name, "tokens_per_s": round(statistics.median(ours)),
            "d2l_tokens_per_s": round(statistics.median(theirs)),
            "ratio": round(statistics.median(a / b for a, b in zip(ours, theirs)), 3), "rounds": rounds}), flush=True)


def peer_rows(repo: Path, rounds: int = 40) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        install_d2l(f"{tmp}/d2l")
        from pipeline.training.launch import trainer_env

        env = trainer_env({"PYTHONPATH": str(repo)})  # OpenMP's waiting as the launcher sets it
        proc = subprocess.run([sys.executable, __file__, f"{tmp}/d2l", f"{tmp}/runs", str(rounds)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"peer rows failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("PEER ")]


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
