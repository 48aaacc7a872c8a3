"""Process-wide setup: where caches go, and starting or joining Ray.

Ray specifics stay here and in the pool/trainer modules so the algorithm reads like the paper.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray

from s3ray.storage import STORAGE_ENV_VARS

log = logging.getLogger("s3ray")


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def alive_nodes() -> list[dict]:
    """The Ray cluster's live nodes (`ray.nodes()` entries). Ray must be initialised."""
    return [n for n in ray.nodes() if n.get("Alive")]


def node_resources() -> list:
    """Every live node's total and free resources (`capacity.Node`), the free ones per node from Ray's
    state API (the public `ray.available_resources()` only sums them over the cluster). Ray must be
    initialised."""
    from ray._private.state import available_resources_per_node  # a DeveloperAPI, kept to this one place

    from s3ray.capacity import Node

    free = available_resources_per_node()
    return [Node(n["NodeID"], dict(n["Resources"]), dict(free.get(n["NodeID"], {}))) for n in alive_nodes()]


def one_node() -> bool:
    """Whether the Ray cluster is this one machine. Ray must be initialised."""
    return len(alive_nodes()) == 1


def cap_to_local_cores(cpus: float) -> float:
    """`cpus` Ray CPUs as threads: a one-node cluster may advertise more CPUs than cores (see `init_ray`),
    and more torch threads than cores run slower, so cap at the cores there. Ray must be initialised."""
    return min(cpus, local_cores()) if one_node() else cpus


def set_cache_dirs(root: str | Path) -> None:
    """Keep vLLM's, torch's and DeepSpeed's caches under `root` unless the user chose otherwise."""
    root = Path(root)
    for var, sub in [
        ("VLLM_CACHE_ROOT", "vllm"),
        ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"),
    ]:
        os.environ.setdefault(var, str(root / sub))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install is reported elsewhere
        return False


# Loggers that only say "the State API is unreachable", which is always true on a local cluster started
# without a dashboard (see `init_ray`).
_STATE_API_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_warnings() -> None:
    """Ray worker setup hook: raise the State-API-polling loggers to ERROR in every worker process."""
    for name in _STATE_API_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# Driver variables every job process needs: offline mode, engine settings, and how to reach run storage.
_JOB_ENV_VARS = (
    "HF_HUB_OFFLINE", "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM", "S3RAY_ENGINE_CALL_LOG",
    *STORAGE_ENV_VARS,
)
# Cache folders are paths on the driver's disk: passed on only to a cluster this process starts (one machine).
# On a cluster it joins, each node keeps its own (set where its `ray start` runs), as another node may not
# have, or may not be allowed to write, the driver's home.
_NODE_LOCAL_VARS = ("VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "S3RAY_CACHE")
# Set by `ray job submit` in the entrypoint's environment: the submitter's --runtime-env(-json).
_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_runtime_env() -> dict:
    """The runtime env the job was submitted with ({} outside `ray job submit`)."""
    raw = os.environ.get(_JOB_CONFIG_VAR)
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def without_job_conflicts(ours: dict, job: dict) -> dict:
    """`ours` less what the submitted runtime env `job` already sets, so the two merge and the user's values
    win. `ray.init` refuses a runtime env that repeats a field or an env var key of the job's."""
    job_vars = job.get("env_vars") or {}
    out = {k: v for k, v in ours.items() if k not in job or k == "env_vars"}
    if "env_vars" in ours:  # env vars merge key by key
        out["env_vars"] = {k: v for k, v in ours["env_vars"].items() if k not in job_vars}
    return out


def job_env_vars(joining: bool) -> dict[str, str]:
    """The driver's variables that every job process gets; node-local cache paths only on a cluster this
    process starts itself."""
    forwarded = _JOB_ENV_VARS if joining else _JOB_ENV_VARS + _NODE_LOCAL_VARS
    return {k: os.environ[k] for k in forwarded if k in os.environ}


def fit_keeping_ctrl_c(trainer):
    """`trainer.fit()` of a Ray Train trainer, with Ctrl-C working afterwards as it did before. Ray Train's
    fit installs its own SIGINT handler (abort this training run) and leaves it installed, so after the first
    student a Ctrl-C during synthesis only asked a finished controller to abort and the run went on."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        return trainer.fit()
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if before is not None:  # None: a handler set outside Python, which cannot be put back from here
            signal.signal(signal.SIGINT, before)


def cluster_address(address: str | None) -> str | None:
    """`address`, else $RAY_ADDRESS (set for a `ray job submit` entrypoint, as `ray.init()` reads it): code
    that would start a local cluster, a benchmark say, joins the job's cluster instead."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS) when given, else start a local cluster. Idempotent."""
    if ray.is_initialized():
        return
    address = cluster_address(address)
    kwargs: dict = {"runtime_env": {"env_vars": job_env_vars(joining=bool(address))}, "log_to_driver": True}
    if address:
        log.info("joining Ray cluster at %s", address)
        kwargs["runtime_env"] = without_job_conflicts(kwargs["runtime_env"], submitted_runtime_env())
        ray.init(address=address, **kwargs)
    else:
        if temp_dir:
            kwargs["_temp_dir"] = str(temp_dir)
        if num_cpus is None:
            # The idle teacher actor keeps its CPU reservation while the student trains and Ray Data mines
            # errors; on a 2-core machine that leaves Ray Data's read tasks no CPU and the pipeline waits
            # forever. Logical CPUs oversubscribe a small machine so every stage can be scheduled.
            num_cpus = max(local_cores(), 4)
        # Without a dashboard there is no State API, and Ray Train's placement-group cleaner then warns once a
        # second for a whole training run that it cannot query the controller; the hook quiets that logger.
        kwargs["runtime_env"]["worker_process_setup_hook"] = "s3ray.runtime.quiet_state_api_warnings"
        kwargs["runtime_env"] = without_job_conflicts(kwargs["runtime_env"], submitted_runtime_env())
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        log.info("started a local Ray cluster: %s", ray.cluster_resources())
