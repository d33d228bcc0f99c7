"""Errors the pipeline raises on purpose, and the process exit codes that carry them.

Every error says which input is wrong and how. ``retryable`` tells an orchestrator
whether trying again can help: a network hiccup can, a checksum mismatch cannot.
"""

from __future__ import annotations

# Exit codes of `python -m pipeline.training.train` / `rnnlm train` that an orchestrator can act on.
EXIT_OK = 0
EXIT_FAILED = 1  # anything unexpected: retrying may help (a killed rank, a lost node)
EXIT_DO_NOT_RETRY = 3  # bad config, corrupt input, non-finite loss: retrying cannot help


class PipelineError(Exception):
    """Base class. ``retryable=False`` means the same inputs will fail the same way."""

    retryable = False


class ConfigError(PipelineError, ValueError):
    """A configuration is invalid (unknown key, bad value, missing file)."""


class CorpusError(PipelineError, ValueError):
    """A corpus source is unusable: not found, checksum mismatch, empty, not UTF-8, binary."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"corpus source {source!r}: {problem}")


class SourceUnreachableError(CorpusError):
    """The source exists in principle but could not be reached now (network, timeout)."""

    retryable = True


class StorageError(PipelineError, OSError):
    """The artifact store refused a request; ``retryable`` says whether asking again can help
    (a timeout can; an invalid bucket name, a missing bucket or denied access cannot)."""

    def __init__(self, url: str, problem: str, retryable: bool = False):
        self.url = url
        self.retryable = retryable
        super().__init__(f"artifact store {url!r}: {problem}")


class DatasetError(PipelineError, ValueError):
    """A prepared dataset (manifest, shard or vocabulary file) is missing or corrupt."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint or model file is missing or corrupt."""


class GenerationInputError(PipelineError, ValueError):
    """A generation request is invalid: a prefix without tokens, a setting out of range."""


class NonFiniteLossError(PipelineError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class RegistryError(PipelineError):
    """Something about tracking or registration is wrong (not retryable by default)."""


class UnregistrableRunError(RegistryError):
    """The run directory holds a failed, diverged or unfinished training: nothing is logged or
    registered, and retrying cannot change that (unlike ``pipeline.training.launch.TrainingFailedError``,
    a training process that died and may succeed when run again)."""


class RegistryUnavailableError(RegistryError):
    """Reading or writing the MLflow registry failed (unreachable server, locked database...).

    Never read as "absent": the step fails, nothing is promoted, and a retry may succeed."""

    retryable = True
