"""The 8-virtual-device half of test_mesh.py, run in a subprocess (the device count is fixed when
JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python mesh_worker.py WORK_DIR MESH [MESH ...]

For no mesh (one device) and each MESH it runs the same training steps, gradient features and RAISE
episode, and writes WORK_DIR/results.npz with every result under "<mesh>/<what>/<leaf>".
"""

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from parallel_setup import FEATURES, episode_inputs, feature_setup, testbed, trained_params

from jraise import parallel
from jraise.grads.features import compute_features
from jraise.model import init_model, load_model
from jraise.model.hf import save_model
from jraise.select.rl.episode import EpisodeConfig, make_episode
from jraise.train import TrainConfig, train
from jraise.train.loop import optimizer_args, step_functions
from jraise.train.step import param_dtypes, split_trainable

work = Path(sys.argv[1])
specs = ["none", *sys.argv[2:]]
features = feature_setup(work / "features")
data = testbed(work / "episode", n_train=24, categories=["first", "upper", "add"])
episode = episode_inputs(data)
config = TrainConfig(lr=3e-3, epochs=1, batch_size=16, accum=2, n_buckets=2, max_steps=3)
results, shard_shapes, compiles = {}, {}, {}
save_model(init_model(features["config"], seed=7), features["config"], work / "hf-model")


def put(prefix, tree):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        results[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


for spec in specs:
    with parallel.use_mesh(None if spec == "none" else spec):
        loaded, _ = load_model(work / "hf-model")  # read straight into the mesh's sharding
        put(f"{spec}/load", trained_params(loaded))
        shard_shapes[spec] = {jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape) for p, x in
                              jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))}
        model = init_model(features["config"], seed=0)
        run = train(model, features["pool"], config, tempfile.mkdtemp(dir=work), export=False)
        put(f"{spec}/train", trained_params(model))
        graphdef, _, _ = split_trainable(model)
        _, step_fn, _ = step_functions(graphdef, optimizer_args(config, run.steps), param_dtypes(model))
        compiles[spec] = step_fn._cache_size()  # one program per bucket shape used, none per step
        put(f"{spec}/loss", np.array([json.loads(line)["loss"] for line in run.metrics_path.read_text().splitlines()]))
        put(f"{spec}/features", compute_features(features["graphdef"], features["trainable"], features["frozen"],
                                                 features["pool"], np.arange(len(features["pool"])), FEATURES, "sft",
                                                 features["moments"], dtypes=features["dtypes"]))
        actor_graphdef, actor_state = nnx.split(episode["actor"])
        fn = make_episode(episode["graphdef"], episode["tx"], episode["dtypes"], actor_graphdef,
                          EpisodeConfig(steps=4, per_cluster=2))
        trainable, _, rollout, losses = fn(actor_state, episode["trainable"], episode["tx"].init(episode["trainable"]),
                                           episode["frozen"], episode["static"], episode["layout"], episode["pool"],
                                           episode["val"], jax.random.key(5))
        put(f"{spec}/episode/trainable", parallel.tree_to_host(trainable))
        put(f"{spec}/episode/rollout", parallel.tree_to_host(rollout))
        put(f"{spec}/episode/train_losses", parallel.to_host(losses))

np.savez(work / "results.npz", **results)
(work / "info.json").write_text(json.dumps({"devices": jax.device_count(), "specs": specs, "shard_shapes": shard_shapes,
                                                "compiles": compiles}))
