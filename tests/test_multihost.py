"""Multi-process launch detection on hand-made environments: JAX_* variables, Slurm, Open MPI.

`jax.distributed.initialize` is the boundary: it is replaced by a recorder, so each environment shows
what would be started (the real two-process run is tests/test_sharding.py's `two_processes`)."""

import pytest

from jaxedit.errors import JaxeditError
from jaxedit.sharding import initialize_distributed, multihost

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000"}
ALL = multihost.ENV + ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") + tuple(SLURM) + tuple(OMPI)


@pytest.fixture
def launch(monkeypatch):
    """Set exactly `env` (the other launch variables unset); -> the jax.distributed.initialize calls it makes."""
    calls = []
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(multihost.jax.distributed, "is_initialized", lambda: False)

    def run(env: dict):
        for key in ALL:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        calls.clear()
        return initialize_distributed(), list(calls)

    return run


def test_jax_variables_start_the_named_cluster(launch):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert launch(env) == (True, [(("10.0.0.1:1234",), {"num_processes": 4, "process_id": 3})])
    assert launch(env | SLURM | {"SLURM_NTASKS": "8"})[1][0][1] == {"num_processes": 4, "process_id": 3}  # JAX_* first
    with pytest.raises(JaxeditError, match="JAX_PROCESS_ID is not"):
        launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"})
    with pytest.raises(JaxeditError, match="must be integers"):
        launch(env | {"JAX_PROCESS_ID": "one"})


@pytest.mark.parametrize("cluster, count", [(SLURM, "SLURM_NTASKS"), (OMPI, "OMPI_COMM_WORLD_SIZE")])
def test_slurm_and_open_mpi_with_several_tasks_leave_the_details_to_jax(launch, cluster, count):
    assert launch(cluster | {count: "2"}) == (True, [((None,), {})])  # jax reads the cluster's own variables
    assert launch(cluster | {count: "1"}) == (False, [])  # one task: a single-process run
    assert launch(cluster) == (False, [])  # no task count: one task
    for missing in cluster:  # an incomplete cluster environment (e.g. an salloc shell without srun)
        assert launch({k: v for k, v in cluster.items() if k != missing} | {count: "2"}) == (False, [])


def test_no_launch_variables_is_a_single_process_run(launch):
    assert launch({}) == (False, [])
    assert launch({"SLURM_NTASKS": "4"}) == (False, [])  # a count without the cluster's other variables
