"""Train on a Ray cluster: Ray Train's TorchTrainer runs pipeline.training.train's loop on every worker.

    python -m pipeline.training.ray_launch --address auto --workers 4 --gpus-per-worker 1 \\
        --run-dir DIR --dataset URI --config RUN.yaml

This module is the Ray *driver*. Ray places the N workers (across nodes, all or
none), sets up their process group (gloo on CPU, NCCL on GPU) and, when a worker
or node is lost, restarts the whole group up to ``max_failures`` times. Every
worker runs ``pipeline.training.train.train`` exactly as under torchrun, and a restarted
group resumes from the project's newest checkpoint in the run directory (Ray's
own checkpoints are not used): the run directory must be on storage every node
sees (the shared storage root), and the result is the same run directory.

``pipeline.training.launch.launch_training(..., ray=RayCluster(...))`` starts this driver
as a child process and streams its output like torchrun's; Ray prefixes worker
lines with ``(RayTrainWorker pid=..., ip=...)``, which :func:`worker_line` strips.

Which retry layer applies when:

* a worker process or node dies mid-run: Ray restarts the group (``max_failures``
  times); the driver, and so the Prefect task, never sees it;
* Ray gives up (``max_failures`` spent), the driver or the head node is lost, or
  the cluster cannot be reached: the driver exits non-zero, ``launch_training``
  raises the retryable TrainingFailedError and Prefect's task retries start a new
  driver, which resumes from the newest checkpoint too;
* bad config or dataset, a non-finite loss: workers finish without raising (a
  restart cannot help, so Ray must not restart), FAILED.json says why, and the
  launcher raises the do-not-retry error that stops Prefect's retries as well.

Ray is an optional extra (``pip install 'rnnlm[ray]'``): it is imported only here,
inside the functions that need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.config_sources import load_config
from pipeline.errors import EXIT_DO_NOT_RETRY, EXIT_FAILED, EXIT_OK, ConfigError, PipelineError

log = logging.getLogger("pipeline.training.ray_launch")

# Environment the workers need from the driver's (Ray starts them from the raylet's, not ours).
FORWARDED_ENV_PREFIXES = ("RNNLM_", "OMP_", "RAY_TRAIN_ENABLE_PRINT_PATCH", "AWS_", "GOOGLE_", "FSSPEC_")
# "(RayTrainWorker pid=123, ip=10.0.0.2) text": Ray's prefix of a line a worker printed.
_WORKER_PREFIX = re.compile(r"^\((?:[A-Za-z_][\w.:]* )?pid=\d+(?:, ip=[^)]*)?\) ")


@dataclass(frozen=True)
class RayCluster:
    """Where and how to run on Ray; the number of workers is the launcher's ``nproc``.

    ``address``: ``auto`` (the cluster this machine belongs to, e.g. after ``ray start``),
    ``local`` (start a private single-node Ray for this run), ``ray://host:10001``
    (Ray Client) or a GCS ``host:port``.
    """

    address: str = "auto"
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_failures: int = 2

    def __post_init__(self):
        if not self.address:
            raise ConfigError("ray address is empty: use auto, local, ray://HOST:PORT or HOST:PORT")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"gpus_per_worker must be >= 0 and cpus_per_worker > 0, got "
                              f"{self.gpus_per_worker} and {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")


def ray_command(run_dir: str, dataset_uri: str, config_path: str, *, workers: int, cluster: RayCluster,
                checkpoint_dir: str | None = None, python: str = sys.executable) -> list[str]:
    """The argv of the Ray driver (this module)."""
    cmd = [python, "-m", "pipeline.training.ray_launch", "--address", cluster.address, "--workers", str(workers),
           "--gpus-per-worker", str(cluster.gpus_per_worker), "--cpus-per-worker", str(cluster.cpus_per_worker),
           "--max-failures", str(cluster.max_failures), "--run-dir", run_dir, "--dataset", dataset_uri,
           "--config", config_path]
    return cmd + (["--checkpoint-dir", checkpoint_dir] if checkpoint_dir else [])


def driver_env() -> dict[str, str]:
    """What the driver child needs: plain, un-deduplicated worker lines, streamed as printed."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would otherwise echo every print() a second time via logging.
    return {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "PYTHONUNBUFFERED": "1"}


def worker_line(line: str) -> str:
    """A driver output line without Ray's worker prefix (so JSON metric lines parse as JSON)."""
    return _WORKER_PREFIX.sub("", line, count=1)


def check_devices(device: str, cluster: RayCluster) -> None:
    if device == "cuda" and not cluster.gpus_per_worker:
        raise ConfigError("train.device is 'cuda' but the Ray workers get no GPU: set --gpus-per-worker")
    if device == "cpu" and cluster.gpus_per_worker:
        raise ConfigError(f"train.device is 'cpu' but --gpus-per-worker is {cluster.gpus_per_worker}: "
                          "Ray would set up NCCL for CPU tensors")


def check_capacity(total: dict[str, float], per_worker: dict[str, float], workers: int, *, grows: bool) -> None:
    """Ray waits (forever, on a fixed cluster) for resources it lacks: say so, or fail if it cannot grow."""
    short = {k: (v * workers, total.get(k, 0)) for k, v in per_worker.items() if v * workers > total.get(k, 0)}
    if not short:
        return
    what = ", ".join(f"{k}: {need:g} needed, {have:g} in the cluster" for k, (need, have) in short.items())
    if not grows:
        raise ConfigError(f"{workers} Ray workers do not fit on this machine ({what}): lower --workers "
                          "or the resources per worker")
    log.warning("the cluster is too small for %d workers now (%s): Ray waits until it grows "
                "(autoscaler) or resources are freed", workers, what)


# ------------------------------------------------------------------------------ worker


def train_worker(job: dict[str, Any]) -> None:
    """One Ray Train worker: the project's loop in the process group Ray set up."""
    import ray
    import ray.train

    from pipeline.training.distributed import setup_distributed
    from pipeline.training.rundir import write_failure
    from pipeline.training.train import train
    from pipeline.data.training_data import load_dataset

    ctx = ray.train.get_context()
    placement = (ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ctx.get_local_world_size())
    _log_to_stderr(placement[0])
    cuda_index = None
    if job["gpus_per_worker"]:
        from ray.train.torch import get_device

        cuda_index = get_device().index  # Ray chose this worker's GPU; it need not be LOCAL_RANK
    log.info("rank %d of %d on node %s (pid %d)", placement[0], placement[1],
             ray.get_runtime_context().get_node_id(), os.getpid())
    cfg = RunConfig.model_validate(job["run_config"])
    try:
        d = setup_distributed(cfg.train.device, placement=placement, cuda_index=cuda_index)
        train_ids, val_ids, vocab_size = load_dataset(job["dataset"])
        train(train_ids, val_ids, vocab_size, cfg.model, cfg.train, job["run_dir"],
              checkpoint_dir=job["checkpoint_dir"], dist_info=d)
    except PipelineError as e:
        if e.retryable:
            raise  # Ray restarts the group, which resumes from the newest checkpoint
        log.error("%s: %s", type(e).__name__, e)
        if placement[0] == 0 and not getattr(e, "recorded", False):
            write_failure(job["run_dir"], e)
        # Return without raising: a restart cannot fix this. The driver reports it from FAILED.json.


def _log_to_stderr(rank: int) -> None:
    """pipeline.* logs as under torchrun; Ray forwards worker stderr to the driver."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# ------------------------------------------------------------------------------ driver


def fit(run_dir: str, dataset_uri: str, run_cfg: RunConfig, *, workers: int, cluster: RayCluster,
        checkpoint_dir: str | None = None) -> None:
    """Run the TorchTrainer to completion; raises ray.train's TrainingFailedError when Ray gives up."""
    import ray
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pipeline import storage
    from pipeline.training.processes import LAUNCHER_PID_ENV

    fs, path = storage.filesystem(run_dir)
    # Not the launcher's pid: it names a process of this host, meaningless on a worker's.
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != LAUNCHER_PID_ENV}
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
    except ConnectionError as e:
        if "Could not find any running Ray instance" not in str(e):
            raise  # a cluster that exists but did not answer: a new attempt may reach it
        raise ConfigError(f"no running Ray cluster found for --ray-address {cluster.address}: start one "
                          f"(`ray start --head`) or pass --ray-address local") from None
    try:
        resources = {"CPU": cluster.cpus_per_worker, **({"GPU": cluster.gpus_per_worker}
                                                         if cluster.gpus_per_worker else {})}
        check_capacity(ray.cluster_resources(), resources, workers, grows=cluster.address != "local")
        job = {"run_config": run_cfg.model_dump(mode="json"), "dataset": dataset_uri, "run_dir": run_dir,
               "checkpoint_dir": checkpoint_dir, "gpus_per_worker": cluster.gpus_per_worker}
        trainer = TorchTrainer(
            train_worker, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cluster.gpus_per_worker),
                                         resources_per_worker=resources),
            # Ray keeps its bookkeeping in the run directory (shared storage, through our fsspec
            # filesystem, so any root works); the checkpoints are the trainer's own.
            run_config=RayRunConfig(name="ray", storage_path=path, storage_filesystem=PyFileSystem(FSSpecHandler(fs)),
                                    failure_config=FailureConfig(max_failures=cluster.max_failures)))
        trainer.fit()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.training.ray_launch", description=__doc__.split("\n")[0])
    p.add_argument("--address", default="auto", help="auto, local, ray://HOST:PORT or HOST:PORT")
    p.add_argument("--workers", type=int, required=True, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-failures", type=int, default=2, help="group restarts Ray may do (-1: unlimited)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--config", required=True, help="RunConfig YAML with model/train sections")
    p.add_argument("--checkpoint-dir", help="default: RUN_DIR/checkpoints")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [ray driver] %(levelname)s %(name)s: %(message)s")
    from pipeline import storage
    from pipeline.training.rundir import write_failure

    try:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        cluster = RayCluster(args.address, args.gpus_per_worker, args.cpus_per_worker, args.max_failures)
        run_cfg = load_config(RunConfig, args.config)
        check_devices(run_cfg.train.device, cluster)
        try:
            import ray.train  # noqa: F401
        except ImportError:
            raise ConfigError("launcher 'ray' needs Ray Train: pip install 'rnnlm[ray]'") from None
        fit(args.run_dir, args.dataset, run_cfg, workers=args.workers, cluster=cluster,
            checkpoint_dir=args.checkpoint_dir)
        # Workers that hit a do-not-retry failure return normally (see train_worker).
        return EXIT_DO_NOT_RETRY if storage.exists(storage.join(args.run_dir, "FAILED.json")) else EXIT_OK
    except PipelineError as e:
        log.error("%s: %s", type(e).__name__, e)
        if not e.retryable:
            write_failure(args.run_dir, e)
        return EXIT_FAILED if e.retryable else EXIT_DO_NOT_RETRY
    except Exception as e:  # Ray gave up, or the cluster could not be reached: a new attempt may do better
        log.error("Ray training failed: %s: %s", type(e).__name__, e)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
