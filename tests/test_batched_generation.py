"""Batched generation gives every prefix what it gets alone; the request limits; the device.

Models are small and random, so the file runs in seconds.
Equality is on tokens: the logits of a row agree with its one-at-a-time logits to float
rounding (the BLAS picks other kernels for other batch sizes), which no argmax or draw here
falls within.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, TokenizerConfig
from pipeline.errors import ConfigError, GenerationInputError
from pipeline.model import generate as gen_module
from pipeline.model.generate import (MAX_NUM_TOKENS, MAX_PREFIX_CHARS, MAX_PREFIXES, MAX_REQUEST_TOKENS,
                                     WARMUP_WINDOW, check_request, generate, generate_batch)
from pipeline.model.lm import LanguageModel, resolve_device
from pipeline.model.models import build_model
from tests.test_cli import rnnlm

torch.set_num_threads(1)

CHARS = ["<unk>", " ", *"abcdefghij"]
WORDS = ["<unk>", "the", "time", "traveller", "machine", "was", "a", "of", "and", "it", "to", "in"]
# Different lengths, one past a warm-up window, two of the same length, one of one token.
SCALE = 0.4  # varied outputs, and dynamics that do not amplify float rounding over 137 steps
LENGTHS = [5, 1, 12, 5, WARMUP_WINDOW + 9, 3, 30]


def random_model(vocab_size: int, cell: str = "gru", backend: str = "torch", **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, backend=backend, hidden_size=16, num_layers=2, embed_size=8,
                      init="normal", init_scale=SCALE, **extra)
    return build_model(cfg, vocab_size).eval()


def random_prefixes(vocab: list[str], lengths=LENGTHS) -> list[list[str]]:
    g = torch.Generator().manual_seed(1)
    return [[vocab[int(i)] for i in torch.randint(1, len(vocab), (n,), generator=g)] for n in lengths]


def by_hand(model, vocab: list[str], prefix: list[str], num_tokens: int) -> list[str]:
    """d2l's loop, one row: feed the prefix token by token, then feed back each argmax."""
    with torch.no_grad():
        state = None
        for t in prefix:
            logits, state = model(torch.tensor([[vocab.index(t)]]), state)
        out = []
        for _ in range(num_tokens):
            out.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[out[-1]]]), state)
    return [vocab[i] for i in out]


@pytest.mark.parametrize("backend", ["torch", "scratch"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_batch_equals_one_at_a_time(cell, backend):
    model = random_model(len(CHARS), cell, backend)
    prefixes = random_prefixes(CHARS)
    greedy = [g.tokens for g in generate_batch(model, CHARS, prefixes, 20)]
    assert greedy == [generate(model, CHARS, p, 20).tokens for p in prefixes]
    assert greedy == [by_hand(model, CHARS, p, 20) for p in prefixes]  # not through generate at all
    assert len({tuple(t) for t in greedy}) > 2  # the rows' states differ: a leak would show
    # Sampling: row i draws from its own generator seeded as its one-at-a-time call is.
    seeds = [3, 1, 4, 1, 5, 9, 2]
    sampled = generate_batch(model, CHARS, prefixes, 20, temperature=1.0, top_k=6, seeds=seeds)
    assert [g.tokens for g in sampled] == [generate(model, CHARS, p, 20, temperature=1.0, top_k=6, seed=s).tokens
                                           for p, s in zip(prefixes, seeds)]
    one_seed = generate_batch(model, CHARS, prefixes, 20, temperature=1.0, seeds=7)
    assert [g.tokens for g in one_seed] == [generate(model, CHARS, p, 20, temperature=1.0, seed=7).tokens
                                            for p in prefixes]
    assert [g.tokens for g in one_seed] != greedy


def test_batches_split_at_max_batch_and_keep_the_order(monkeypatch):
    model = random_model(len(CHARS), "lstm")
    prefixes = random_prefixes(CHARS, [4, 9, 2, 7, 4, 1, 6, 3, 8, 5])
    whole = [g.tokens for g in generate_batch(model, CHARS, prefixes, 15, temperature=0.8, seeds=list(range(10)))]
    calls = []
    real = gen_module._generate_rows
    monkeypatch.setattr(gen_module, "_generate_rows", lambda model, rows, *a: calls.append(len(rows)) or
                        real(model, rows, *a))
    split = generate_batch(model, CHARS, prefixes, 15, temperature=0.8, seeds=list(range(10)), max_batch=3)
    assert calls == [3, 3, 3, 1]
    assert [g.tokens for g in split] == whole


def test_adaptive_softmax_batches_too():
    model = random_model(len(CHARS), "gru", softmax="adaptive", adaptive_cutoffs=(4, 8))
    prefixes = random_prefixes(CHARS)
    assert [g.tokens for g in generate_batch(model, CHARS, prefixes, 12)] == \
        [generate(model, CHARS, p, 12).tokens for p in prefixes]


@pytest.mark.parametrize("level, vocab, texts", [
    ("char", CHARS, ["abc", "j", "hello ja", "a b c d e f g h i j " * 8, "abz"]),
    ("word", WORDS, ["the time", "machine", "it was a traveller of the time machine and", "in", "the flux"]),
])
@pytest.mark.parametrize("backend", ["torch", "scratch"])
def test_language_model_generate_many(level, vocab, texts, backend):
    lm = LanguageModel(random_model(len(vocab), "gru", backend), vocab, TokenizerConfig(level=level, normalizer="none"))
    assert lm.generate_many(texts, 10) == [lm.generate(t, 10) for t in texts]
    assert lm.generate_many(texts, 10, temperature=1.0, seed=[5, 6, 7, 8, 9]) == \
        [lm.generate(t, 10, temperature=1.0, seed=s) for t, s in zip(texts, [5, 6, 7, 8, 9])]
    info = lm.generate_many_with_info(texts, 3)
    assert info[-1].unknown == (["z"] if level == "char" else ["flux"])
    with pytest.raises(GenerationInputError, match="has no tokens"):
        lm.generate_many(["the", ""], 3)


def test_check_request_limits():
    check_request(["a"] * MAX_PREFIXES, 1)
    check_request(["a" * MAX_PREFIX_CHARS], MAX_NUM_TOKENS)
    for prefixes, num_tokens, problem in [
        ([], 5, "no prefixes"),
        (["a"] * (MAX_PREFIXES + 1), 5, f"at most {MAX_PREFIXES}"),
        (["a", "b" * (MAX_PREFIX_CHARS + 1)], 5, "prefix 1 has 10,001 characters"),
        (["a"] * (MAX_REQUEST_TOKENS // 1000 + 1), 1000, "tokens in one request"),
    ]:
        with pytest.raises(GenerationInputError, match=problem):
            check_request(prefixes, num_tokens)


def test_device_is_chosen_at_load_time(tmp_path):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu7")
    lm = LanguageModel(random_model(len(CHARS)), CHARS, TokenizerConfig(level="char", normalizer="none"))
    lm.save(str(tmp_path))
    loaded = LanguageModel.from_dir(str(tmp_path), device="auto")
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            LanguageModel.from_dir(str(tmp_path), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_batch_on_gpu_equals_one_at_a_time_on_gpu(cell):
    model = random_model(len(CHARS), cell).cuda()
    prefixes = random_prefixes(CHARS)
    assert [g.tokens for g in generate_batch(model, CHARS, prefixes, 20)] == \
        [generate(model, CHARS, p, 20).tokens for p in prefixes]
    sampled = generate_batch(model, CHARS, prefixes, 20, temperature=1.0, seeds=list(range(len(prefixes))))
    assert [g.tokens for g in sampled] == [generate(model, CHARS, p, 20, temperature=1.0, seed=i).tokens
                                           for i, p in enumerate(prefixes)]


# ------------------------------------------------------------------------------ the CLI


def char_run_dir(path):
    lm = LanguageModel(random_model(28), ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"],
                       TokenizerConfig(level="char", normalizer="d2l"))
    lm.save(str(path))
    return path, lm


def test_cli_generates_many_prefixes_in_order(tmp_path):
    run_dir, lm = char_run_dir(tmp_path / "run")
    (tmp_path / "prefixes.txt").write_text("the time\n\nmachine\n", encoding="utf-8")
    proc = rnnlm("generate", "--run", str(run_dir), "--prefix", "traveller", "--prefix", "a",
                 "--prefix-file", str(tmp_path / "prefixes.txt"), "--num-tokens", "12", "--temperature", "1",
                 "--seed", "4", cwd=tmp_path)
    prefixes = ["traveller", "a", "the time", "machine"]
    assert proc.stdout.splitlines() == [lm.generate(p, 12, temperature=1.0, seed=4) for p in prefixes]


@pytest.mark.parametrize("args, problem", [
    (["--prefix", "a", "--num-tokens", str(MAX_NUM_TOKENS + 1)], f"num_tokens must be in [0, {MAX_NUM_TOKENS}]"),
    (["--prefix", "b" * (MAX_PREFIX_CHARS + 1)], f"prefix 0 has {MAX_PREFIX_CHARS + 1:,} characters"),
    (["--prefix-file", "many.txt"], f"{MAX_PREFIXES + 1:,} prefixes in one request"),
    (["--prefix-file", "missing.txt"], "--prefix-file missing.txt: cannot be read"),
    ([], "no prefix"),
])
def test_cli_refuses_requests_over_the_limits(tmp_path, args, problem):
    run_dir, _ = char_run_dir(tmp_path / "run")
    (tmp_path / "many.txt").write_text("abc\n" * (MAX_PREFIXES + 1))
    proc = rnnlm("generate", "--run", str(run_dir), *args, cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rnnlm: error:") and problem in last, proc.stderr


def test_warm_up_takes_the_longest_prefixs_steps_not_the_sum():
    """The rows run together and leave at their own lengths: the calls cover max(LENGTHS) steps."""
    model = random_model(len(CHARS), "lstm")
    prefixes = random_prefixes(CHARS)
    seen = []
    forward = model.forward
    model.forward = lambda X, *a, **k: seen.append(X.shape) or forward(X, *a, **k)
    generate_batch(model, CHARS, prefixes, 0)
    assert sum(T for _, T in seen) == max(LENGTHS)
    assert max(T for _, T in seen) <= WARMUP_WINDOW
    assert seen[0][0] == len(LENGTHS)  # every row in the first call
