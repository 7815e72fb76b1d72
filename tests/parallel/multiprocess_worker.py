"""One process of the multi-process feature-extraction test (run by test_multiprocess.py).

    python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID WORK_DIR MESH

Joins a `jax.distributed` run over localhost, builds the same tiny testbed, model and LoRA adapters
as every other process (deterministic from seeds), and fills one feature store in WORK_DIR/store on
the global mesh MESH; process 0 writes the shards. Then trains a tiny model for 3 steps into the
shared run directory WORK_DIR/train (process 0 writes the metrics log and the exported model; Orbax
writes the checkpoints). Writes WORK_DIR/done-<id>.json when finished.
"""

import json
import sys
from pathlib import Path

from jraise import parallel

port, n_proc, proc_id, work, mesh_spec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
parallel.initialize_distributed(f"localhost:{port}", n_proc, proc_id)

import jax  # noqa: E402  (after jax.distributed.initialize)

from parallel_setup import feature_setup, store_features, train_run  # noqa: E402

setup = feature_setup(work / f"data-{proc_id}")
with parallel.use_mesh(mesh_spec):
    mesh = parallel.active_mesh()
    store = store_features(setup, work / "store")
    run = train_run(setup, work / "train")
(work / f"done-{proc_id}.json").write_text(json.dumps({
    "process_index": jax.process_index(), "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
    "mesh": dict(mesh.shape), "complete": store.is_complete, "train_steps": run.steps,
    "final_dir": str(run.final_dir)}))
