"""Typed, validated configuration for every stage.

Each stage gets one small pydantic model of plain values. Unknown keys are an
error (``extra="forbid"``) so a typo in a YAML file fails loudly instead of
being ignored. ``parse_config`` validates a raw mapping; where the mappings come
from (presets, YAML files, overrides) is ``pipeline.config_sources``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

BUILTIN_TIMEMACHINE = "builtin://timemachine"
TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


class Strict(BaseModel):
    """Base for all configs: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data


SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.9, "val": 0.05, "test": 0.05}


class SourceConfig(Strict):
    """One corpus source: a local path, an fsspec URL (globs allowed) or ``builtin://NAME``.

    ``split``: the split this file is (PTB's ``ptb.train.txt``, WikiText's ``wiki.valid.tokens``).
    """

    url: str
    sha1: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    split: Literal["train", "val", "test"] | None = None


class TokenizerConfig(Strict):
    """How text becomes tokens.

    ``normalizer``: ``d2l`` reproduces the book (per line: non-letters -> one space,
    strip, lowercase); ``lower`` lowercases; ``none`` keeps raw Unicode. ``d2l`` would
    turn PTB/WikiText's literal ``<unk>`` into the word ``unk``, so a word-level corpus
    holding one is refused with it: use ``none`` (or ``lower``) there.
    ``newlines``: what happens to line breaks. ``drop`` concatenates lines with no
    separator (what d2l does), ``space`` turns each into a space (the lyrics example),
    ``keep`` keeps ``\\n`` as a character. Default: ``drop`` for d2l, ``keep`` otherwise.
    ``eos``: word level only, append ``<eos>`` after every non-empty line (the PTB convention);
    ``eos_on_empty_lines`` after empty lines too (WikiText's, as pytorch/examples counts it).
    """

    level: Literal["char", "word"] = "char"
    normalizer: Literal["d2l", "lower", "none"] = "d2l"
    newlines: Literal["drop", "space", "keep"] | None = None
    eos: bool = False
    eos_on_empty_lines: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if self.eos and self.level != "word":
            raise ValueError("eos=true needs level='word'")
        if self.eos_on_empty_lines and not self.eos:
            raise ValueError("eos_on_empty_lines=true needs eos=true")
        if self.newlines is None:
            object.__setattr__(self, "newlines", "drop" if self.normalizer == "d2l" else "keep")
        return self


class PinnedVocab(Strict):
    """A vocabulary to reuse: a prepared dataset (its directory) or its ``vocab.parquet``;
    ``sha256``, if given, that vocab.parquet's."""

    uri: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class VocabConfig(Strict):
    """d2l vocabulary: ``<unk>`` at 0, reserved tokens next, then by descending frequency.

    ``count_on``: the tokens counted for it: ``train`` (only with named splits, and their
    default: valid/test words unseen in train become ``<unk>``) or ``all``. ``pinned`` (a URI,
    or ``{uri, sha256}``) reuses that vocabulary instead: tokens outside it become ``<unk>``.
    """

    min_freq: int = Field(default=0, ge=0)
    max_size: int | None = Field(default=None, ge=1)
    reserved_tokens: tuple[str, ...] = ()
    count_on: Literal["train", "all"] | None = None
    pinned: PinnedVocab | None = None

    @field_validator("pinned", mode="before")
    @classmethod
    def _uri_alone(cls, v: Any) -> Any:
        return {"uri": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "VocabConfig":
        if self.pinned and (self.min_freq or self.max_size or self.reserved_tokens):
            raise ValueError("vocab.pinned fixes the vocabulary: min_freq, max_size and reserved_tokens do not apply")
        return self


class SplitConfig(Strict):
    """Contiguous train/val/test fractions of the token stream, after an optional cap.

    Fractions left out take the defaults (0.9 / 0.05 / 0.05); with sources that name
    their splits there are no fractions, and ``max_tokens`` caps the train split only.
    """

    train: float | None = Field(default=None, gt=0, le=1)
    val: float | None = Field(default=None, ge=0, lt=1)
    test: float | None = Field(default=None, ge=0, lt=1)
    max_tokens: int | None = Field(default=None, ge=1)



class DataConfig(Strict):
    """Everything that determines a prepared dataset (and so its content address).

    ``root_dir``: a local copy of the corpus (behind a firewall): each source is read from
    ``root_dir/<its file name>`` instead of its URL (for ``zip://member::URL``, the
    member's name), checksums still checked. Where the files are is not part of the dataset id.
    """

    sources: tuple[SourceConfig, ...] = (SourceConfig(url=BUILTIN_TIMEMACHINE, sha1=TIMEMACHINE_SHA1),)
    tokenizer: TokenizerConfig = TokenizerConfig()
    vocab: VocabConfig = VocabConfig()
    splits: SplitConfig = SplitConfig()
    tokens_per_shard: int = Field(default=1_000_000, ge=1)
    chunk_bytes: int = Field(default=16 * 2**20, ge=1024)
    root_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not self.sources:
            raise ValueError("sources must name at least one corpus")
        named = [s.split for s in self.sources if s.split]
        fractions = [k for k in SPLIT_NAMES if getattr(self.splits, k) is not None]
        if named:
            if len(named) != len(self.sources):
                unnamed = ", ".join(s.url for s in self.sources if not s.split)
                raise ValueError(f"when a source names its split, every source must: no split for {unnamed}")
            if "train" not in named:
                raise ValueError("sources name their splits but none is split: train")
            if fractions:
                raise ValueError(f"sources name their splits, so split fractions do not apply: remove "
                                 f"{', '.join('splits.' + k for k in fractions)}")
            # each split is its files in the order given; splits in train, val, test order
            object.__setattr__(self, "sources", tuple(sorted(self.sources, key=lambda s: SPLIT_NAMES.index(s.split))))
        elif self.vocab.count_on == "train":
            raise ValueError("vocab.count_on=train needs sources that name their splits (split: train|val|test)")
        else:
            filled = {**DEFAULT_FRACTIONS, **{k: getattr(self.splits, k) for k in fractions}}
            if abs(sum(filled.values()) - 1.0) > 1e-9:
                raise ValueError(f"splits: the fractions must sum to 1, got {sum(filled.values()):g}")
            object.__setattr__(self, "splits", self.splits.model_copy(update=filled))
        if self.vocab.count_on is None:
            object.__setattr__(self, "vocab", self.vocab.model_copy(update={"count_on": "train" if named else "all"}))
        return self

    @property
    def named_splits(self) -> bool:
        return self.sources[0].split is not None


# -------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """A recurrent language model: embedding -> recurrent stack -> vocabulary projection.

    ``embed_size=None`` is d2l's one-hot input: a vocabulary-wide embedding fixed to the
    identity, not trained (a one-hot vector times W_xh is a lookup of W_xh).

    Regularisation (all off by default, active in train mode only). ``dropout`` is d2l's
    element-wise dropout between layers and on the output. The AWD-LSTM recipe (Merity et
    al. 2017) uses instead *locked* dropout, one mask per sequence shared by every time step:
    on the embedding output (``dropout_input``; ``dropout_input_mode="per_step"`` draws a mask
    per time step instead, as Zaremba et al. 2014 do), between layers (``dropout_between``) and on
    the last layer's output (``dropout_output``); plus ``dropout_embedding`` (whole words
    dropped from the embedding) and ``weight_drop`` (DropConnect on the hidden-to-hidden
    weights, one mask per batch).
    """

    cell: Literal["rnn", "gru", "lstm"] = "gru"
    backend: Literal["torch", "scratch"] = "torch"
    hidden_size: int = Field(default=256, ge=1)
    num_layers: int = Field(default=1, ge=1)
    embed_size: int | None = Field(default=None, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    tie_weights: bool = False
    init: Literal["normal", "uniform", "default"] = "normal"
    init_scale: float = Field(default=0.01, gt=0)  # std for "normal", range for "uniform"
    dropout_input: float = Field(default=0.0, ge=0, lt=1)
    # "per_step": a fresh mask at every time step (Zaremba et al. 2014's dropout on the
    # embeddings' output) instead of one locked mask per sequence.
    dropout_input_mode: Literal["locked", "per_step"] = "locked"
    dropout_between: float = Field(default=0.0, ge=0, lt=1)
    dropout_output: float = Field(default=0.0, ge=0, lt=1)
    dropout_embedding: float = Field(default=0.0, ge=0, lt=1)
    weight_drop: float = Field(default=0.0, ge=0, lt=1)
    # The output head. "adaptive" is torch's AdaptiveLogSoftmaxWithLoss (Grave et al. 2017):
    # token ids below adaptive_cutoffs[0] form the shortlist, each further range a cluster
    # with a smaller projection (hidden / adaptive_div_value**k). Ids must be sorted by
    # descending frequency, which the d2l vocabulary is. For vocabularies of ~10k and more.
    # "auto" picks by the training device and the vocabulary where each head was measured
    # faster (pipeline.model.models.choose_softmax); adaptive_cutoffs then optional.
    softmax: Literal["full", "adaptive", "auto"] = "full"
    adaptive_cutoffs: tuple[int, ...] | None = None  # increasing, each in [1, vocab_size)
    adaptive_div_value: float = Field(default=4.0, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.nonlinearity == "relu" and self.cell != "rnn":
            raise ValueError("nonlinearity='relu' applies to cell='rnn' only")
        if self.dropout and (self.dropout_between or self.dropout_output):
            raise ValueError("dropout (element-wise) and dropout_between/dropout_output (locked) act at "
                             "the same places: set one kind")
        if self.dropout_input_mode == "per_step" and not self.dropout_input:
            raise ValueError("dropout_input_mode='per_step' needs dropout_input > 0")
        cuts = self.adaptive_cutoffs
        if self.softmax == "adaptive" or (self.softmax == "auto" and cuts is not None):
            if not cuts or cuts[0] < 1 or any(b <= a for a, b in zip(cuts, cuts[1:])):
                raise ValueError(f"softmax='{self.softmax}' needs adaptive_cutoffs: strictly increasing "
                                 f"positive token ids, e.g. [2000, 10000]; got {cuts}")
        if self.softmax != "full" and self.tie_weights:
            raise ValueError("tie_weights needs softmax='full' (the adaptive head has no "
                             "vocabulary-sized output matrix to share)")
        if self.softmax == "full" and cuts is not None:
            raise ValueError("adaptive_cutoffs applies to softmax='adaptive' or 'auto' only")
        if self.tie_weights and self.embed_size is not None and self.embed_size != self.hidden_size:
            raise ValueError("tie_weights needs embed_size == hidden_size")
        return self


# ----------------------------------------------------------------------- training


class TrainConfig(Strict):
    """The training loop's knobs. Defaults are d2l's ch. 8-9 settings.

    AWD-LSTM's training recipe, all off by default:

    * ``optimizer: nt_asgd``: SGD until validation has not beaten the best of all but the last
      ``nt_asgd_window`` epochs, then SGD with iterate averaging; the averaged weights are
      validated, checkpointed and shipped.
    * ``ar`` / ``tar``: activation regularisation (``ar * mean(h^2)`` of the last layer's
      dropped output) and temporal activation regularisation (``tar * mean((h_t - h_{t-1})^2)``
      of its raw output), added to the training loss.
    * ``variable_bptt``: each batch's length is drawn around ``num_steps`` (sequential sampling),
      and the lr is scaled by ``length / num_steps``.
    * ``patience``: stop after this many evaluations without a better validation perplexity.

    Budgets and evaluation on large corpora (docs/scale.md): ``max_steps`` and ``max_minutes``
    end the run at the next step boundary, mid-epoch if need be, with a final validation and
    a checkpoint that a bigger budget resumes exactly. ``eval_every_steps`` validates, writes
    a metrics line and a checkpoint every that many steps instead of at each epoch's end;
    ``patience``, ``keep_best``, the ``plateau`` schedule and the NT-ASGD trigger then count
    those evaluations instead of epochs.
    """

    batch_size: int = Field(default=32, ge=1)
    num_steps: int = Field(default=35, ge=1)
    sampling: Literal["random", "sequential"] = "sequential"
    epochs: int = Field(default=10, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)  # training time, all attempts: stop at the next step
    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps, all attempts
    eval_every_steps: int | None = Field(default=None, ge=1)  # None: evaluate at each epoch's end
    optimizer: Literal["sgd", "adam", "adamw", "nt_asgd"] = "sgd"
    nt_asgd_window: int = Field(default=5, ge=1)  # AWD-LSTM's "nonmono"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    clip_norm: float | None = Field(default=1.0, gt=0)  # theta for global-L2-norm clipping
    lr_schedule: Literal["constant", "decay", "plateau"] = "constant"
    lr_decay: float = Field(default=0.5, gt=0, le=1)  # multiplier per epoch / per plateau
    lr_decay_after: int = Field(default=0, ge=0)  # "decay": epochs at full lr
    lr_patience: int = Field(default=0, ge=0)  # "plateau": evaluations without improvement
    seed: int = 0
    keep_best: bool = True  # ship the weights of the evaluation with the lowest validation perplexity
    patience: int | None = Field(default=None, ge=1)  # early stopping, in evaluations
    ar: float = Field(default=0.0, ge=0)
    tar: float = Field(default=0.0, ge=0)
    variable_bptt: bool = False
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision (torch.autocast, see pipeline.training.precision): bf16 or fp16 (with a gradient
    # scaler), on CUDA or CPU (where fp16 is slow: it exists to test the scaler path).
    # The recurrence and the loss's log-softmax stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True  # CUDA only: TF32 tensor-core matmuls for fp32 work (no effect on CPU)
    # CUDA, one process: replay the training step as a CUDA graph (pipeline.training.cuda_graph).
    cuda_graphs: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.variable_bptt and self.sampling != "sequential":
            raise ValueError("variable_bptt needs sampling='sequential' (consecutive windows of one stream)")
        if self.cuda_graphs:
            conflicts = [what for what, on in (("variable_bptt (a new batch length every step)", self.variable_bptt),
                                               ("precision fp16 (the gradient scaler reads the device every step)",
                                                self.precision == "fp16"),
                                               ("optimizer nt_asgd (it swaps the weights the graph holds)",
                                                self.optimizer == "nt_asgd")) if on]
            if conflicts:
                raise ValueError(f"cuda_graphs cannot be used with {'; '.join(conflicts)}")
        return self


class GateConfig(Strict):
    """The champion/challenger gate (``pipeline.registry.gate``)."""

    # A champion whose tokenizer or vocabulary differs from the candidate's dataset cannot be
    # compared like for like: keep it (default), or promote the candidate anyway.
    on_incomparable: Literal["keep", "promote"] = "keep"


class RetentionConfig(Strict):
    """What ``rnnlm gc`` keeps in a storage root (``pipeline.store.retention``; docs/retention.md).

    Whatever these say, gc never deletes a version holding an alias, what a kept version needs
    (its MLflow run, run directory, dataset, corpus), nor anything a live flow run leases or a
    live training locks.
    """

    keep_versions: int = Field(default=3, ge=1, description="versions kept per registered model, "
                               "aliased ones (champion, challenger) included, then the newest")
    keep_runs: int = Field(default=2, ge=0, description="newest run directories kept besides those kept versions need")
    keep_datasets: int = Field(default=2, ge=0, description="newest datasets kept besides those kept runs need")
    finished_run_checkpoints: int = Field(default=0, ge=0, description="checkpoints a finished, registered run keeps "
                                          "(0: none; its model.pt is the result, and a nightly never resumes it)")
    min_age_hours: float = Field(default=1.0, ge=0, description="nothing younger is deleted (a run starting now)")
    stale_run_hours: float = Field(default=48.0, ge=0, description="an unfinished, unlocked run directory untouched "
                                   "this long is abandoned: it may go")
    staging_max_age_hours: float = Field(default=24.0, ge=0, description="staging dirs (*.tmp-*) and intermediate "
                                         "stage outputs (work/) older than this are swept")
    quarantine_max_age_hours: float = Field(default=14 * 24.0, ge=0, description="quarantined files older than this are swept")
    lease_max_age_hours: float = Field(default=48.0, gt=0, description="a flow run's lease older than this is stale")


class RunConfig(Strict):
    """What ``rnnlm train --config FILE`` reads: a dataset, a model, a training loop and the gate."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()


C = TypeVar("C", bound=BaseModel)


def parse_config(cls: type[C], raw: dict[str, Any] | None, *, source: str = "config") -> C:
    """Validate ``raw`` as ``cls``; errors name the source and every bad key."""
    try:
        return cls.model_validate(raw or {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {cls.__name__} in {source}: {problems}") from None
