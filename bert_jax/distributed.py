"""Processes: `jax.distributed` initialisation from `config.distributed`, barriers and
gathering a sharded tree onto every host. One process (no cluster) makes all of these no-ops."""
from __future__ import annotations

import jax
from jax.experimental import multihost_utils


def initialize(c) -> None:
    """jax.distributed.initialize from config.distributed; 'auto' initializes only where
    JAX detects a cluster (TPU pod, SLURM, ...) and otherwise runs as one process."""
    if c.initialize == "never" or jax.distributed.is_initialized():
        return
    explicit = bool(c.coordinator_address or c.num_processes)
    if explicit:
        jax.distributed.initialize(
            coordinator_address=c.coordinator_address or None,
            num_processes=c.num_processes or None,
            process_id=c.process_id if c.process_id >= 0 else None)
    elif c.initialize == "always" or cluster_detected():
        jax.distributed.initialize()


def cluster_detected() -> bool:
    """Whether JAX's cluster auto-detection (TPU pod, SLURM, ...) finds an environment;
    methods JAX only uses on request (e.g. mpi4py) do not count."""
    try:
        from jax._src.clusters import ClusterEnv  # noqa: PLC0415 (no public API for this)
        return any(not env.opt_in_only_method and env.is_env_present()
                   for env in ClusterEnv._cluster_types)  # noqa: SLF001
    except (ImportError, AttributeError):
        return False


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather(tree):
    """A tree of (possibly sharded, multi-host) jax.Arrays -> the same tree of full host
    numpy arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
