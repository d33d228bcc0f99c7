"""Prefect tasks: thin wrappers over ``pipeline``, named by verbs, returning small manifests."""

from tasks.caching import StagePolicy, bind
from tasks.data import build_vocab, count_tokens, encode_shards, fetch_corpus, write_shards
from tasks.options import PipelineOptions
from tasks.register import log_sweep, register_model
from tasks.train import evaluate_model, train_model

__all__ = ["PipelineOptions", "StagePolicy", "bind", "fetch_corpus", "count_tokens", "build_vocab",
           "encode_shards", "write_shards", "train_model", "evaluate_model", "register_model", "log_sweep"]
