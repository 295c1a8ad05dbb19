"""The processes of a multi-host training job (`jax.distributed`): start-up, who writes, and barriers.

Every process runs the same job on the same inputs (multi-controller JAX): each one loads the model and
tasks, evaluates and takes every fusion decision itself, and together they run each jitted step over one
mesh of all their devices. Only process 0 writes the run folder (run.json, scores, adapters, reports,
metrics); Orbax checkpoints are written by all of them together (the data position is per process). So
`--out` must be a folder every host sees at the same path (NFS, Filestore, a GCS FUSE mount).

Start-up (`initialize`): with any of --coordinator-address / --num-processes / --process-id the job calls
`jax.distributed.initialize` with them (JAX fills the others from the environment, as it documents for
Cloud TPU, SLURM and Open MPI). With none, it calls `jax.distributed.initialize()` when the environment
describes a job of more than one process (`cluster_processes`), and runs as a single process otherwise.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

# Environment variables that launchers set to the number of processes of a job (JAX's cluster detection
# reads the rest of the job's description from the same launchers' variables).
PROCESS_COUNT_VARIABLES = ("SLURM_STEP_NUM_TASKS",  # SLURM: the tasks of this srun step (1 in a batch script)
                           "OMPI_COMM_WORLD_SIZE")  # Open MPI, under mpirun
# Cloud TPU (GKE, multislice): the hosts of the slice, comma-separated.
TPU_HOSTS_VARIABLE = "TPU_WORKER_HOSTNAMES"


def cluster_processes(environ=os.environ) -> int:
    """The number of processes the environment's launcher started for this job (1 when there is none)."""
    for name in PROCESS_COUNT_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    hosts = [h for h in environ.get(TPU_HOSTS_VARIABLE, "").split(",") if h.strip()]
    return max(len(hosts), 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the job's processes (see the module docstring); call before any JAX computation."""
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if explicit or cluster_processes() > 1:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
    """Whether this process writes the run folder."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for a single process); `name` says which barrier."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
