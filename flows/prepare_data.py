"""The ``prepare-data`` flow: fetch -> count (map over chunks) -> vocab -> encode (map) -> shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from flows.runtime import default_task_runner, flow_run_id, state_names
from pipeline.config import DataConfig
from pipeline.corpus import located_sources
from tasks.common import PipelineOptions, bind, retry_if_retryable
from tasks.data import build_vocab, count_tokens, encode_shards, fetch_corpus, plan, write_shards


def fetch_retry_options(options: PipelineOptions) -> dict[str, Any]:
    """Exponential backoff with jitter, on retryable errors only (network), never on checksum mismatch."""
    delays = [options.fetch_retry_delay_s * 2**i for i in range(options.fetch_retries)]
    return {"retries": options.fetch_retries, "retry_delay_seconds": delays or 0, "retry_jitter_factor": 0.5,
            "retry_condition_fn": retry_if_retryable}


@flow(name="prepare-data", task_runner=default_task_runner(), validate_parameters=True)
def prepare_data_flow(data: DataConfig = DataConfig(), options: PipelineOptions = PipelineOptions()) -> dict[str, Any]:
    """Turn raw text into a prepared dataset; returns its manifest (and each stage's task-run states)."""
    root = options.store_root()

    fetches = bind(fetch_corpus, options, **fetch_retry_options(options)).map(source=list(located_sources(data)),
                                                                              root=unmapped(root))
    fetched = [f.result() for f in fetches]

    chunks = plan([d for f in fetched for d in f["documents"]], data.chunk_bytes)

    counts = bind(count_tokens, options).map(chunk=chunks, tokenizer=unmapped(data.tokenizer), root=unmapped(root))
    vocab = bind(build_vocab, options).submit(chunks, counts, data, root)

    encoded = bind(encode_shards, options).map(chunk=chunks, tokenizer=unmapped(data.tokenizer), vocab=unmapped(vocab),
                                               root=unmapped(root))
    dataset = bind(write_shards, options).submit(fetched, data, vocab, encoded, root)

    result = dataset.result()
    stages = {"fetch_corpus": state_names(*fetches), "count_tokens": state_names(*counts),
              "build_vocab": state_names(vocab), "encode_shards": state_names(*encoded),
              "write_shards": state_names(dataset)}
    return {**result, "stages": stages, "flow_run_id": flow_run_id()}
