"""How the flows run (not what they compute: that is the RunConfig): :class:`PipelineOptions`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.training.ray_launch import RayCluster

ENV_DASK = "RNNLM_DASK"
ENV_RESULTS = "RNNLM_RESULTS"


class PipelineOptions(BaseModel):
    """How the flows run (not what they compute: that is the RunConfig). A flow parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Optional[str] = Field(default=None, description="artifact root; default $RNNLM_STORAGE or ./.rnnlm")
    results: Optional[str] = Field(default=None, description="task result storage (fsspec URL); default $RNNLM_RESULTS or <root>/prefect-results")
    locks: Optional[str] = Field(default=None, description="lock directory; default <root>/locks (local roots) or $PREFECT_HOME/rnnlm-locks")
    redis_url: Optional[str] = Field(default=None, description="redis://host:port/db: a Redis lock manager (prefect-redis) for runs on several hosts")
    dask: Optional[str] = Field(default=None, description="map stages on Dask: 'local' (LocalCluster), 'local-threads' (processes=False) or a scheduler address; default $RNNLM_DASK, else a thread pool")
    max_workers: Optional[int] = Field(default=None, ge=1, description="thread pool size for map stages")
    fetch_retries: int = Field(default=4, ge=0)
    fetch_retry_delay_s: float = Field(default=2.0, ge=0, description="first backoff delay; doubles each retry, with jitter")
    train_retries: int = Field(default=2, ge=0)
    train_retry_delay_s: float = Field(default=5.0, ge=0)
    nproc: int = Field(default=1, ge=1, description="training processes: on this node under torchrun (when > 1), "
                                                    "or Ray Train workers across the cluster under launcher='ray'")
    launcher: Literal["torchrun", "ray"] = Field(
        default="torchrun", description="'torchrun': the trainer runs on this host; 'ray': a Ray Train job on the "
                                        "cluster at ray_address (pip install 'rnnlm[ray]'; deployments/README.md)")
    ray_address: str = Field(default="auto", min_length=1, description="launcher='ray': 'auto' (this host's cluster), "
                                                                       "'local' (a private Ray), 'ray://HOST:10001' or HOST:PORT")
    gpus_per_worker: float = Field(default=0, ge=0, description="launcher='ray': GPUs per worker (0: CPU, gloo)")
    ray_max_failures: int = Field(default=2, ge=-1, description="launcher='ray': group restarts after a lost worker "
                                                                "or node, within one task attempt (-1: unlimited)")
    grace_s: float = Field(default=30.0, ge=0, description="seconds a training process gets after SIGTERM before it is killed")
    sample_prefixes: tuple[str, ...] = ("time traveller", "the time machine")
    sample_tokens: int = Field(default=100, ge=1)
    sample_temperature: float = Field(default=0.7, ge=0)
    register_model: bool = Field(default=True, description="register the model in MLflow and run the champion gate")
    pin_vocab: Optional[Literal["champion"]] = Field(
        default=None, description="'champion': pin data.vocab.pinned to the current champion's dataset vocabulary "
                                  "(pipeline.registry.champion_vocab), so a growing corpus stays comparable; no champion: unpinned")
    # distributed mode (see flows/retrain.py and deployments/README.md)
    dispatch: Literal["local", "deployments"] = Field(
        default="local", description="'local': stages run as subflows in this process; 'deployments': each stage "
                                     "is a flow run of its deployment (run_deployment), on that deployment's work pool")
    prepare_deployment: str = Field(default="prepare-data/cpu", description="'flow/deployment' of the data stage (dispatch=deployments)")
    train_deployment: str = Field(default="train/gpu", description="'flow/deployment' of the training stage (dispatch=deployments)")
    dispatch_timeout_s: float = Field(default=6 * 3600.0, gt=0, description="how long the parent waits for one dispatched stage; then it is cancelled")
    dispatch_poll_s: float = Field(default=5.0, gt=0, description="how often the parent polls a dispatched stage's state")

    def store_root(self) -> str:
        return storage.storage_root(self.root)

    def results_url(self) -> str:
        return (self.results or os.environ.get(ENV_RESULTS) or storage.join(self.store_root(), "prefect-results")).rstrip("/")

    def lock_dir(self) -> str:
        if self.locks:
            return self.locks
        root = self.store_root()
        if storage.is_local(root):
            return storage.join(storage.local_path(root), "locks")
        from prefect.settings import PREFECT_HOME

        return str(Path(PREFECT_HOME.value()) / "rnnlm-locks")

    def ray_cluster(self) -> Optional[RayCluster]:
        """Where the train stage runs under launcher='ray'; None under torchrun."""
        if self.launcher != "ray":
            return None
        return RayCluster(address=self.ray_address, gpus_per_worker=self.gpus_per_worker,
                          max_failures=self.ray_max_failures)

    def dask_target(self) -> Optional[str]:
        return self.dask or os.environ.get(ENV_DASK) or None
