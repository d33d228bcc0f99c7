"""The ``prepare-data`` flow: fetch -> count (map over chunks) -> vocab -> encode (map) -> shards."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from flows.progress import chunks_done
from flows.reports import state_names
from flows.run_context import flow_run_id
from flows.task_runners import default_task_runner
from pipeline.config import DataConfig
from pipeline.data.corpus import located_sources
from tasks.caching import bind
from tasks.data import build_vocab, count_tokens, encode_shards, fetch_corpus, plan, write_shards
from tasks.options import PipelineOptions
from tasks.retries import backoff_options


@flow(name="prepare-data", task_runner=default_task_runner(), validate_parameters=True)
def prepare_data_flow(data: DataConfig = DataConfig(), options: PipelineOptions = PipelineOptions()) -> dict[str, Any]:
    """Turn raw text into a prepared dataset; returns its manifest (and each stage's task-run states)."""
    root = options.store_root()

    fetcher = bind(fetch_corpus, options, **backoff_options(options.fetch_retries, options.fetch_retry_delay_s))
    fetches = fetcher.map(source=list(located_sources(data)), root=unmapped(root))
    fetched = [f.result() for f in fetches]

    chunks = plan([d for f in fetched for d in f["documents"]], data.chunk_bytes, data.tokenizer)

    counter = bind(count_tokens, options).with_options(on_completion=[chunks_done("count", len(chunks))])
    counts = counter.map(chunk=chunks, tokenizer=unmapped(data.tokenizer), root=unmapped(root))
    vocab = bind(build_vocab, options).submit(chunks, counts, data, root)

    encoder = bind(encode_shards, options).with_options(on_completion=[chunks_done("encode", len(chunks))])
    encoded = encoder.map(chunk=chunks, tokenizer=unmapped(data.tokenizer), vocab=unmapped(vocab), root=unmapped(root))
    dataset = bind(write_shards, options).submit(fetched, data, vocab, encoded, root)

    result = dataset.result()
    stages = {"fetch_corpus": state_names(*fetches), "count_tokens": state_names(*counts),
              "build_vocab": state_names(vocab), "encode_shards": state_names(*encoded),
              "write_shards": state_names(dataset)}
    return {**result, "stages": stages, "flow_run_id": flow_run_id()}
