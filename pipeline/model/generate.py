"""Text generation as in d2l 9.5: warm up on a prefix, then predict one token at a time.

Tokens in, tokens out: turning text into tokens is the tokenizer's job. Prefix
tokens missing from the vocabulary map to index 0 (``<unk>``) and are reported.

:func:`check_settings` holds the rules for generation settings that every entry point
applies (``generate`` itself, ``rnnlm generate``, the served model's params).

Greedy decoding (argmax) is the default. With ``temperature > 0`` the next token
is sampled from ``softmax(logits / temperature)``, optionally restricted to the
``top_k`` most likely tokens, from a local ``torch.Generator`` seeded by
``seed`` so the global RNG is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.errors import GenerationInputError
from pipeline.model.models import RNNLM
from pipeline.data.tokenizer import UNK

MAX_NUM_TOKENS = 10_000  # per request, for the CLI and the served model
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
    check_settings(num_tokens, temperature, top_k, seed)
    if len(vocab_tokens) != model.vocab_size:
        raise ValueError(f"vocab_tokens has {len(vocab_tokens)} tokens but the model has "
                         f"vocab_size {model.vocab_size}")
    if vocab_tokens[0] != UNK:
        raise ValueError(f"vocab_tokens[0] must be {UNK!r}, got {vocab_tokens[0]!r}")

    index = {token: i for i, token in enumerate(vocab_tokens)}
    unknown = [t for t in prefix_tokens if t not in index]
    prefix_ids = [index.get(t, 0) for t in prefix_tokens]
    greedy = not temperature
    generator = None
    if not greedy:
        # Sampling happens on the CPU, so a seed gives the same text on any device.
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(seed)

    device = device if device is not None else model.embedding.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Warm-up: the whole prefix in one call (same as feeding it token by token);
            # its last logits predict the first new token.
            logits, state = model(torch.tensor([prefix_ids], device=device))
            out: list[int] = []
            for step in range(num_tokens):
                last = logits[0, -1]
                next_id = int(last.argmax()) if greedy else _sample(last, temperature, top_k, generator)
                out.append(next_id)
                if step + 1 < num_tokens:  # the last token need not be fed back
                    logits, state = model(torch.tensor([[next_id]], device=device), state)
    finally:
        model.train(was_training)
    return Generation(tokens=[vocab_tokens[i] for i in out], unknown=unknown)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator) -> int:
    logits = logits.double().cpu() / temperature
    candidates = torch.arange(logits.numel())
    if top_k is not None and top_k < logits.numel():
        logits, candidates = torch.topk(logits, top_k)
    choice = torch.multinomial(torch.softmax(logits, dim=0), 1, generator=generator)
    return int(candidates[choice])
