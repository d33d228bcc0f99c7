"""Text generation as in d2l 9.5: warm up on a prefix, then predict one token at a time.

Tokens in, tokens out: turning text into tokens is the tokenizer's job. Prefix
tokens missing from the vocabulary map to index 0 (``<unk>``) and are reported.

:func:`generate_batch` continues many prefixes as one batch: the warm-up runs the rows
together, each leaving at the end of its own prefix (no padding enters a recurrent
state), then every row takes each step together. A row gets the tokens it gets alone
(:func:`generate` is a batch of one); the logits agree to float rounding only, since
the BLAS picks other kernels for other batch sizes, so an exact tie could resolve apart.
Work is split into batches of at most ``MAX_BATCH`` rows and warm-up windows of
``WARMUP_WINDOW`` tokens, which bounds the memory a request takes.

:func:`check_settings` holds the rules for generation settings and :func:`check_request`
the limits on one request, which every entry point applies (``rnnlm generate``, the
served model's params); ``generate`` itself applies ``check_settings``.

Greedy decoding (argmax) is the default. With ``temperature > 0`` the next token
is sampled from ``softmax(logits / temperature)``, optionally restricted to the
``top_k`` most likely tokens, from a local ``torch.Generator`` seeded by
``seed`` so the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.errors import GenerationInputError
from pipeline.model.models import RNNLM
from pipeline.data.tokenizer import UNK

# The limits on one request, for the CLI and the served model (HTTP 400 / exit 3 beyond them).
MAX_NUM_TOKENS = 10_000  # tokens generated per prefix
MAX_PREFIXES = 256  # prefixes in one request
MAX_PREFIX_CHARS = 10_000  # characters in one prefix (at most 40 KB of UTF-8)
MAX_REQUEST_TOKENS = 200_000  # prefixes x num_tokens: bounds the time one request holds a worker
# How work is split, to bound memory: the warm-up's activations are MAX_BATCH x WARMUP_WINDOW
# x (gates + 1) x hidden floats per layer (190 MB for a 1150-wide LSTM), each step's logits
# MAX_BATCH x vocabulary floats. More rows than MAX_BATCH run as several batches.
MAX_BATCH = 64
WARMUP_WINDOW = 128
Level = Literal["char", "word"]


def join_tokens(tokens: list[str], level: Level) -> str:
    """Characters join with nothing, words with one space."""
    if level == "char":
        return "".join(tokens)
    if level == "word":
        return " ".join(tokens)
    raise ValueError(f"unknown token level {level!r}: expected 'char' or 'word'")


def check_settings(num_tokens: int, temperature: float | None = 0.0, top_k: int | None = None,
                   seed: int | None = None, *, max_num_tokens: int | None = None) -> None:
    """The rules for generation settings; raises GenerationInputError naming the setting.

    ``num_tokens`` >= 0 (and at most ``max_num_tokens`` if given); ``temperature`` >= 0
    (0 or None: greedy); ``top_k`` None (no limit) or >= 1; ``seed`` None (a fresh random
    seed) or >= 0.
    """
    if num_tokens < 0 or (max_num_tokens is not None and num_tokens > max_num_tokens):
        bound = f"in [0, {max_num_tokens}]" if max_num_tokens is not None else ">= 0"
        raise GenerationInputError(f"num_tokens must be {bound}, got {num_tokens}")
    if temperature is not None and not temperature >= 0:  # NaN fails too
        raise GenerationInputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationInputError(f"top_k must be >= 1, got {top_k}")
    if seed is not None and seed < 0:
        raise GenerationInputError(f"seed must be >= 0, got {seed}")


def check_request(prefixes: Sequence[str], num_tokens: int) -> None:
    """The limits on one request (see the constants above); raises GenerationInputError naming the limit."""
    if not prefixes:
        raise GenerationInputError("no prefixes: give at least one")
    if len(prefixes) > MAX_PREFIXES:
        raise GenerationInputError(f"{len(prefixes):,} prefixes in one request: at most {MAX_PREFIXES} "
                                   f"(send several requests)")
    for i, prefix in enumerate(prefixes):
        if len(prefix) > MAX_PREFIX_CHARS:
            raise GenerationInputError(f"prefix {i} has {len(prefix):,} characters: at most {MAX_PREFIX_CHARS:,}")
    if len(prefixes) * num_tokens > MAX_REQUEST_TOKENS:
        raise GenerationInputError(f"{len(prefixes)} prefixes x {num_tokens} tokens = {len(prefixes) * num_tokens:,} "
                                   f"tokens in one request: at most {MAX_REQUEST_TOKENS:,}")


@dataclass
class Generation:
    tokens: list[str]  # the generated continuation, without the prefix
    unknown: list[str]  # prefix tokens not in the vocabulary (fed to the model as <unk>)


def generate(model: RNNLM, vocab_tokens: list[str], prefix_tokens: list[str], num_tokens: int, *,
             temperature: float | None = 0.0, top_k: int | None = None, seed: int | None = None,
             device: torch.device | str | None = None) -> Generation:
    """Continue ``prefix_tokens`` by ``num_tokens`` tokens.

    ``vocab_tokens[i]`` is the token of index ``i``, with ``<unk>`` at 0.
    ``temperature`` 0 or None means greedy (``top_k`` and ``seed`` are then
    unused). Runs in eval mode under ``torch.no_grad`` and restores the
    model's mode; ``device`` defaults to the model's.
    """
    if not prefix_tokens:
        raise GenerationInputError("prefix_tokens is empty: generation needs at least one token to start from")
    return generate_batch(model, vocab_tokens, [prefix_tokens], num_tokens, temperature=temperature, top_k=top_k,
                          seeds=[seed], device=device)[0]


def generate_batch(model: RNNLM, vocab_tokens: list[str], prefixes: Sequence[list[str]], num_tokens: int, *,
                   temperature: float | None = 0.0, top_k: int | None = None,
                   seeds: int | None | Sequence[int | None] = None, device: torch.device | str | None = None,
                   max_batch: int = MAX_BATCH) -> list[Generation]:
    """Continue every prefix (a list of tokens) by ``num_tokens`` tokens, as one batch.

    Row ``i`` gets what ``generate`` gives for ``prefixes[i]`` with seed ``seeds[i]`` (one
    seed, or None, applies to every row): each row samples from its own ``torch.Generator``.
    Other arguments as for ``generate``; at most ``max_batch`` rows run together.
    """
    check_settings(num_tokens, temperature, top_k)
    if len(vocab_tokens) != model.vocab_size:
        raise ValueError(f"vocab_tokens has {len(vocab_tokens)} tokens but the model has "
                         f"vocab_size {model.vocab_size}")
    if vocab_tokens[0] != UNK:
        raise ValueError(f"vocab_tokens[0] must be {UNK!r}, got {vocab_tokens[0]!r}")
    seeds = [seeds] * len(prefixes) if seeds is None or isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prefixes):
        raise ValueError(f"{len(seeds)} seeds for {len(prefixes)} prefixes")
    for i, (tokens, seed) in enumerate(zip(prefixes, seeds)):
        if not tokens:
            raise GenerationInputError(f"prefix {i} is empty: generation needs at least one token to start from")
        check_settings(num_tokens, seed=seed)

    index = {token: i for i, token in enumerate(vocab_tokens)}
    rows = [[index.get(t, 0) for t in tokens] for tokens in prefixes]
    greedy = not temperature
    # Sampling happens on the CPU, so a seed gives the same text on any device.
    generators = None if greedy else [_generator(seed) for seed in seeds]
    device = device if device is not None else model.embedding.weight.device
    # Rows of similar length share a batch: fewer warm-up calls per batch.
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    out: list[list[int]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), max_batch):
                batch = order[start:start + max_batch]
                tokens = _generate_rows(model, [rows[r] for r in batch], num_tokens, temperature, top_k,
                                        None if greedy else [generators[r] for r in batch], device)
                for r, ids in zip(batch, tokens):
                    out[r] = ids
    finally:
        model.train(was_training)
    return [Generation(tokens=[vocab_tokens[i] for i in ids], unknown=[t for t in tokens if t not in index])
            for ids, tokens in zip(out, prefixes)]


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh nondeterministic seed
    else:
        generator.manual_seed(seed)
    return generator


def _generate_rows(model: RNNLM, rows: list[list[int]], num_tokens: int, temperature: float | None,
                   top_k: int | None, generators: list[torch.Generator] | None,
                   device: torch.device | str) -> list[list[int]]:
    """One batch: warm up every row on its prefix ids, then step all rows together."""
    logits, state = _warm_up(model, rows, device)  # the last logits predict the first new token
    steps: list[torch.Tensor] = []
    for step in range(num_tokens):
        if generators is None:
            next_ids = logits.argmax(dim=-1)
        else:
            scaled = logits.double().cpu() / temperature
            next_ids = torch.tensor([_sample(row, top_k, g) for row, g in zip(scaled, generators)], device=device)
        steps.append(next_ids)
        if step + 1 < num_tokens:  # the last token need not be fed back
            logits, state = model(next_ids[:, None], state, last_only=True)
            logits = logits[:, -1]
    return torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]


def _warm_up(model: RNNLM, rows: list[list[int]], device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run every row's prefix; the last logits (B, V) and the state, rows in the given order.

    A row's state after t tokens depends on its first t tokens only, so the rows run together,
    shortest first: all of them through the shortest prefix, then the longer ones on from
    there, and so on; a row leaves the batch at its own length with its logits and state. The
    time taken is the longest prefix's, not the sum of all (and no padding enters a state).
    Calls cover at most WARMUP_WINDOW tokens, the state carried across.
    """
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    lengths = [len(rows[r]) for r in order]
    X = torch.zeros(len(rows), lengths[-1], dtype=torch.long)
    for i, r in enumerate(order):
        X[i, :lengths[i]] = torch.tensor(rows[r])
    X = X.to(device)
    logits_parts, state_parts = [], []
    state, first, t = None, 0, 0
    while first < len(order):
        end = min(lengths[first], t + WARMUP_WINDOW)
        logits, state = model(X[first:, t:end], state, last_only=True)
        t = end
        done = first
        while done < len(order) and lengths[done] == t:
            done += 1
        if done > first:  # these rows' prefixes end here
            logits_parts.append(logits[:done - first, -1])
            state_parts.append(tuple(s[:, :done - first] for s in state))
            state = tuple(s[:, done - first:].contiguous() for s in state)
            first = done
    logits = torch.cat(logits_parts)
    state = tuple(torch.cat(parts, dim=1) for parts in zip(*state_parts))
    if order == sorted(order):
        return logits, state
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(rows))
    inverse = inverse.to(device)
    return logits[inverse], tuple(s[:, inverse].contiguous() for s in state)


def _sample(scaled_logits: torch.Tensor, top_k: int | None, generator: torch.Generator) -> int:
    """One draw from softmax of ``scaled_logits`` (logits / temperature, float64 on the CPU)."""
    logits = scaled_logits
    candidates = torch.arange(logits.numel())
    if top_k is not None and top_k < logits.numel():
        logits, candidates = torch.topk(logits, top_k)
    choice = torch.multinomial(torch.softmax(logits, dim=0), 1, generator=generator)
    return int(candidates[choice])
