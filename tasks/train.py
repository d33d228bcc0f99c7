"""Training and evaluation as Prefect tasks.

``train_model`` launches the trainer as a child process (``pipeline.training.launch``: plain
``python -m pipeline.training.train`` for one process, torchrun for more, or with
``options.launcher='ray'`` a Ray Train driver whose workers run on a Ray cluster,
``pipeline.training.ray_launch``), forwards its log lines
and JSON metric lines to the Prefect run logger as they arrive, and returns the run
directory's manifest. The run directory is content-addressed,
``<root>/runs/<hash(dataset_id, model config, train config less its budget, VERSION)>``
(``pipeline.training.launch.run_id``), so asking for more epochs continues the same run, and a retried
attempt (or a later flow run) finds the same checkpoints and the trainer resumes from the
newest one; the log says from where. Non-retryable failures (bad config, NaN loss, bad
dataset) raise errors that ``retry_if_retryable`` refuses to retry.

SIGTERM: ``pipeline.training.launch`` forwards it when it runs on the main thread. Tasks run on
worker threads, so :func:`terminate_children` (installed by the flows as a SIGTERM
handler via :class:`TerminationGuard`) sends SIGTERM to every training child of this
process, waits up to ``grace_s`` for them to write what they can, kills what is left,
and marks the process as terminating so no retry starts.

``evaluate_model`` reports the validation and test perplexity (the one evaluation setting
of ``pipeline.model.evaluate``; the trainer's validation figure is reused) and generates sample
continuations; its key is the trained model's sha256 + the dataset id + the settings.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import psutil
from prefect import get_run_logger, task

from pipeline import storage
from pipeline.config import ModelConfig, RunConfig, TrainConfig
from pipeline.training.metrics import EVALUATION_EVENTS, finite_or_none, read_epochs, with_bits
from pipeline.training.processes import stop_process_trees
from pipeline.training.ray_launch import RayCluster
from tasks.caching import StagePolicy, content_id, jsonable, manifest
from tasks.retries import terminating

VERSION = {"train": 1, "evaluate": 1}
RUN_FILES = ("model.pt", "model_config.json", "result.json", "lm.json")


def run_id(dataset: dict[str, Any], model_config: ModelConfig | dict, train_config: TrainConfig | dict) -> str:
    """The content address of a training run (the same one ``rnnlm train`` uses)."""
    from pipeline.training.launch import run_id as pipeline_run_id

    return pipeline_run_id(dataset["dataset_id"], ModelConfig.model_validate(jsonable(model_config)),
                           TrainConfig.model_validate(jsonable(train_config)))


def train_identity(inputs: dict[str, Any]):
    """The run id (what the weights depend on) plus the budget: the run id leaves out
    ``epochs``/``max_minutes``/``max_steps`` so a bigger budget continues the same run, but the
    task's result does depend on them (a cached 10-epoch result must not answer a 20-epoch ask)."""
    train_config = TrainConfig.model_validate(jsonable(inputs["train_config"]))
    budget = {"epochs": train_config.epochs, "max_minutes": train_config.max_minutes}
    if train_config.max_steps is not None:  # only when set: identities without it stay as they were
        budget["max_steps"] = train_config.max_steps
    return VERSION["train"], {"run": run_id(inputs["dataset"], inputs["model_config"], train_config),
                              "budget": budget,
                              "dataset_manifest": inputs["dataset"].get("manifest_sha256"),
                              "root": storage.storage_root(inputs.get("root"))}


def _format_epoch(e: dict[str, Any], epochs: int) -> str:
    """One log line per epoch; a figure that is missing or not a number reads "n/a", never an error."""
    at = f"epoch {e.get('epoch')}/{epochs}" + (f" step {e.get('step')}" if e.get("event") == "eval" else "")
    return (f"{at}: train ppl {_fmt(e.get('train_ppl'), '.3f')}, "
            f"val ppl {_fmt(e.get('val_ppl'), '.3f')}, {_fmt(e.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"lr {_fmt(e.get('lr'), '.3g')}, grad norm {_fmt(e.get('grad_norm'), '.3f')}, "
            f"{_fmt(e.get('elapsed_s'), '.1f')} s")


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _finished(run_dir: str, epochs: int) -> bool:
    """The run directory holds a finished training of at least ``epochs`` epochs."""
    if not all(storage.exists(storage.join(run_dir, f)) for f in RUN_FILES[:-1]):
        return False
    result = storage.read_json(storage.join(run_dir, "result.json"))
    return bool(result.get("finished")) and int(result.get("epochs") or 0) >= epochs


@task(name="train_model", cache_policy=StagePolicy(stage="train", identity=train_identity), tags=["train"])
def train_model(dataset: dict[str, Any], model_config: ModelConfig, train_config: TrainConfig,
                root: str | None = None, nproc: int = 1, grace_s: float = 30.0,
                ray: RayCluster | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train (or resume) in the content-addressed run directory; return its manifest.

    With ``ray`` the trainer runs as ``nproc`` Ray Train workers on that cluster; the run
    directory, and so the cache key, is the same as under torchrun. ``threads``: CPU threads
    per rank (``RNNLM_NUM_THREADS``), for trials sharing a host's cores (``flows.sweep``);
    not part of the key, as the thread count of any run is not.
    """
    from pipeline.training.launch import launch_training

    logger = get_run_logger()
    root = storage.storage_root(root)
    rid = run_id(dataset, model_config, train_config)
    run_dir = storage.join(root, "runs", rid)
    resumed_from = None
    if _finished(run_dir, train_config.epochs):
        logger.info("run %s already finished in %s: not training again", rid, run_dir)
        events = read_epochs(run_dir)
    else:
        from pipeline.training.checkpoint import list_checkpoints  # imports torch: only when training

        ckpts = list_checkpoints(storage.join(run_dir, "checkpoints")) if storage.exists(run_dir) else []
        if ckpts:
            logger.info("resuming training from checkpoint %s", ckpts[-1])
        else:
            logger.info("training from scratch in %s", run_dir)

        def on_line(line: str) -> None:
            nonlocal resumed_from
            event = _json(line)
            if event is None:
                if line.strip():
                    logger.info("trainer: %s", line)
            elif event.get("event") in EVALUATION_EVENTS:
                logger.info(_format_epoch(event, train_config.epochs))
            elif event.get("event") == "resume":
                resumed_from = {k: event.get(k) for k in ("epoch", "step", "checkpoint")}
                logger.info("trainer resumed from epoch %s step %s (%s)", event.get("epoch"), event.get("step"),
                            event.get("checkpoint"))
            else:
                logger.info("trainer: %s", line)

        cfg = RunConfig(model=model_config, train=train_config)
        from pipeline.training.cpu_threads import THREADS_ENV

        launched = launch_training(run_dir, dataset["uri"], cfg, nproc=nproc, on_line=on_line, grace_s=grace_s,
                                   ray=ray, env={THREADS_ENV: str(threads)} if threads else None)
        events = [e for e in launched.metrics if e.get("event") in EVALUATION_EVENTS] or read_epochs(run_dir)
    from pipeline.model.lm import write_lm_metadata
    from pipeline.data.shards import open_dataset

    write_lm_metadata(run_dir, open_dataset(dataset["uri"]))  # vocabulary + tokenizer: the run dir generates alone
    result = storage.read_json(storage.join(run_dir, "result.json"))
    model_uri = storage.join(run_dir, "model.pt")
    last = events[-1] if events else {}
    return manifest(rid, [storage.join(run_dir, f) for f in RUN_FILES], run_dir=run_dir, model_uri=model_uri,
                    model_sha256=storage.sha256_bytes(storage.read_bytes(model_uri)), dataset_id=dataset["dataset_id"],
                    epochs=result.get("epochs"), steps=result.get("steps"), finished=result.get("finished"),
                    tokens_per_s=result.get("tokens_per_s"), wall_s=result.get("wall_s"), val_ppl=result.get("val_ppl"),
                    train_ppl=last.get("train_ppl"), resumed_from=resumed_from, device=result.get("device"),
                    world_size=result.get("world_size"))


def _json(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


# ------------------------------------------------------------------------------ evaluate


def evaluate_identity(inputs: dict[str, Any]):
    from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    run = inputs["run"]
    return VERSION["evaluate"], {"model_sha256": run["model_sha256"], "run": run["id"],
                                 "dataset_id": inputs["dataset"]["dataset_id"],
                                 "evaluation": {"batch_size": EVAL_BATCH_SIZE, "num_steps": EVAL_NUM_STEPS},
                                 "settings": {k: jsonable(inputs.get(k)) for k in ("prefixes", "num_tokens", "temperature")}}


@task(name="evaluate_model", cache_policy=StagePolicy(stage="evaluate", identity=evaluate_identity), tags=["evaluate"])
def evaluate_model(run: dict[str, Any], dataset: dict[str, Any], prefixes: tuple[str, ...] = ("time traveller",),
                   num_tokens: int = 100, temperature: float = 0.7) -> dict[str, Any]:
    """Validation and test perplexity (and bits per token), and one sampled continuation per prefix.

    Perplexities use the pipeline's one evaluation setting (``pipeline.model.evaluate``), the same
    as the trainer's validation, MLflow's ``final_*_ppl`` and the gate: the trainer's
    validation figure of the shipped model (``result.json``) is reused, not recomputed.
    """
    from pipeline.model.lm import LanguageModel
    from pipeline.data.shards import open_dataset

    logger = get_run_logger()
    eid = content_id("evaluate", *evaluate_identity({"run": run, "dataset": dataset, "prefixes": prefixes,
                                                     "num_tokens": num_tokens, "temperature": temperature}))
    lm = LanguageModel.from_dir(run["run_dir"])
    ds = open_dataset(dataset["uri"])
    ppl = {"val": trained_val_ppl(run, dataset)}
    for split in ("val", "test"):
        ids = ds.split(split)
        if ppl.get(split) is None:
            ppl[split] = lm.perplexity(ids) if len(ids) >= 2 else None
        logger.info("%s perplexity: %s", split, "n/a (split too short)" if ppl[split] is None else f"{ppl[split]:.3f}")
    samples = []
    generated = lm.generate_many_with_info(prefixes, num_tokens, temperature=temperature,
                                           seed=list(range(len(prefixes))))  # one batch, seed i for prefix i
    for i, (prefix, g) in enumerate(zip(prefixes, generated)):
        samples.append({"prefix": prefix, "text": g.text, "unknown": g.unknown})
        logger.info("sample %d: %s", i + 1, g.text)
    out = {**with_bits({"val_ppl": finite_or_none(ppl["val"]), "test_ppl": finite_or_none(ppl["test"])}),
           "samples": samples}
    uri = storage.join(run["run_dir"], f"evaluation-{eid}.json")
    storage.write_json_atomic(uri, out)
    return manifest(eid, [uri], uri=uri, **out)


def trained_val_ppl(run: dict[str, Any], dataset: dict[str, Any]) -> float | None:
    """The trainer's validation perplexity of the shipped model, when it was computed on this
    dataset with the current evaluation setting (else None: evaluate it)."""
    from pipeline.model.evaluate import EVAL_BATCH_SIZE, EVAL_NUM_STEPS

    if run.get("dataset_id") != dataset["dataset_id"]:
        return None
    result = storage.read_json(storage.join(run["run_dir"], "result.json"))
    if (result.get("eval_batch_size"), result.get("eval_num_steps")) != (EVAL_BATCH_SIZE, EVAL_NUM_STEPS):
        return None
    return result.get("val_ppl")


# ----------------------------------------------------------------------------- SIGTERM


def training_children() -> list[psutil.Process]:
    """Training processes this process started (``python -m pipeline.training.train``, torchrun, the Ray driver)."""
    found = []
    try:
        for p in psutil.Process().children(recursive=False):
            try:
                cmd = p.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "pipeline.training.train" in cmd or "pipeline.training.ray_launch" in cmd:
                found.append(p)
    except psutil.NoSuchProcess:
        pass
    return found


def terminate_children(grace_s: float) -> None:
    """SIGTERM every training child (torchrun forwards it to its ranks), wait, then kill the trees."""
    terminating.set()
    stop_process_trees(training_children(), grace_s)


class TerminationGuard:
    """While active (in the main thread), SIGTERM stops training children first, then does what it did before."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.previous = None
        self.installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
        if exc[0] is not None and training_children():  # interrupted (Ctrl-C, crash): leave no orphans
            terminate_children(self.grace_s)
        return False

    def _handle(self, signum, frame):
        terminate_children(self.grace_s)
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
