"""Processes: `jax.distributed` initialisation from `config.distributed`, barriers and
gathering a sharded tree onto every host. One process (no cluster) makes all of these no-ops.

A peer that dies: the collective in flight fails at once on the survivors (its connection is
reset), and `exit_if_peer_lost` turns that into one line naming the lost process and exits.
A survivor that waits elsewhere (or is slower to get there) is stopped by JAX's coordination
service once the peer has sent no heartbeat for `distributed.heartbeat_timeout_seconds`, with
JAX's own fatal message ("... another task died ...").
"""
from __future__ import annotations

import os
import re
import sys

import jax
from jax.experimental import multihost_utils

from bert_jax import cli


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
            process_id=c.process_id if c.process_id >= 0 else None,
            heartbeat_timeout_seconds=c.heartbeat_timeout_seconds)
    elif c.initialize == "always" or cluster_detected():
        jax.distributed.initialize(heartbeat_timeout_seconds=c.heartbeat_timeout_seconds)


# How a collective fails when a peer's connection is gone (gloo on CPU, NCCL, gRPC status).
_CONNECTION_LOST = re.compile(r"Gloo|NCCL|Connection (reset|closed|refused)|Socket closed|UNAVAILABLE|heartbeat")


def lost_processes() -> list[int]:
    """The processes of this jax.distributed job the coordination service no longer counts
    as alive ([0] when the coordinator itself cannot be reached); [] on one process. Every
    live process must call it (JAX's live-node query waits for them all, like a barrier)."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return []
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 (no public API for the live set)
    client = jax_distributed.global_state.client
    try:
        live = client.get_live_nodes(list(range(jax.process_count())))
    except Exception:  # noqa: BLE001 - the coordinator (process 0) is gone
        return [0]
    return [p for p in range(jax.process_count()) if p not in live]


def exit_if_peer_lost(error: BaseException, last_checkpoint: int | None = None) -> None:
    """If another process of the job is gone, print one line naming it (and the error it
    caused here) and exit this process with status 1 at once: nothing collective can finish
    any more, and a normal exit would wait for the lost process at JAX's shutdown barrier.
    Otherwise return (the caller re-raises `error`). Only an error that looks like a lost
    connection asks the coordination service (a query every live process must join)."""
    if not jax.distributed.is_initialized() or not _CONNECTION_LOST.search(str(error)):
        return
    lost = lost_processes()
    if not lost:
        return
    names = ", ".join(f"process {p}" + (" (the coordinator)" if p == 0 else "") for p in lost)
    where = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "resume from the last checkpoint")
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: stopped: {names} of {jax.process_count()} is gone (this process {jax.process_index()} saw: "
          f"{cause[:300]}); restart every process to resume ({where})", file=sys.stderr, flush=True)
    os._exit(cli.RUN_FAILED)


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
