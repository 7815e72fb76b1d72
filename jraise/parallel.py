"""One device mesh for training, gradient features and RAISE; multi-host wiring.

JAX's SPMD runtime is the distributed engine: a `jax.sharding.Mesh` with named axes

* ``data``: batch rows (and pool examples) split across replicas of the weights;
* ``fsdp``: batch rows split as well, *and* every weight matrix split along one dimension
  (fully-sharded data parallel: weights, gradients and Adam moments stored 1/fsdp per device,
  gathered by the compiler where a computation needs them);
* ``tensor``: the output dimension of weight matrices split (tensor parallel), where it divides.

Code that trains or computes features asks `active_mesh()`; when a mesh is active (``with
use_mesh(mesh):``, or ``--mesh`` on the CLI) it places its state with `shard_params`, its batches
with `shard_batch`, and reads results back with `to_host`. Without one, everything stays on the
default device exactly as before. The same jitted programs run either way: XLA partitions them
from the shardings of their inputs (jit's usual SPMD partitioning), so results equal single-device
results to float tolerance (reductions may sum in another order).

Sharding rules (`param_spec`), by shape only so that Adam moments follow their weights:

* arrays with fewer than 2 dimensions (norm gains, biases, scalars): replicated;
* ``tensor``: the last dimension (a kernel's output features, an embedding's width) when
  divisible by the tensor size;
* ``fsdp``: the largest remaining dimension divisible by the fsdp size;
* nothing divides: replicated (small LoRA factors usually end up here: that is fine).

Batches split their row dimension over ``("data", "fsdp")`` jointly; a batch whose row count is
not a multiple of ``data x fsdp`` is an error naming both numbers.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` from explicit arguments or
the environment (``JRAISE_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS``, ``..._NUM_PROCESSES``,
``..._PROCESS_ID``); with none set and no cluster detected it does nothing (one process). Every
process runs the same program on the same host data; `shard_params` / `shard_batch` build global
arrays with `jax.make_array_from_callback`, so each process materialises only the slices its own
devices hold, and `to_host` gathers a result on every process. Writes to shared files are done by
process 0 only (`is_writer`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
ROWS = ("data", "fsdp")  # the mesh axes a batch's rows are split over

Pytree = Any


# ----------------------------------------------------------------------------------------------
# Mesh spec and construction


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the (data, fsdp, tensor) axes; one of them may be -1: all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be >= 1 (or -1 for 'the rest'), got {self}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """``"data=2,fsdp=4"``, ``"fsdp=-1"``, ``"auto"`` / ``""`` (every device on ``data``).
        Axes left out have size 1, except ``data`` which takes the rest when no axis is -1."""
        text = (text or "").strip()
        if text in ("", "auto"):
            return cls()
        sizes: dict[str, int] = {}
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
            if not match or match.group(1) not in AXES:
                raise ValueError(f"mesh spec {text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                                 f"{', '.join(AXES)}, got {part!r}")
            if match.group(1) in sizes:
                raise ValueError(f"mesh spec {text!r}: axis {match.group(1)!r} given twice")
            sizes[match.group(1)] = int(match.group(2))
        if "data" not in sizes:
            sizes["data"] = 1 if -1 in sizes.values() else -1
        return cls(**sizes)

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) whose product is ``n_devices``."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh {self}: {n_devices} devices are not a multiple of {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if int(np.prod(sizes)) != n_devices:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                             f"{n_devices} are available")
        return tuple(sizes)


def make_mesh(spec: MeshSpec | str | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    Device order is JAX's global order, so on a multi-host run the ``data`` axis (the outermost)
    spans hosts and ``tensor`` (the innermost) stays within one: collectives of tensor and fsdp
    then use the fast local links.
    """
    spec = MeshSpec.parse(spec) if isinstance(spec, str) or spec is None else spec
    devices = list(jax.devices() if devices is None else devices)
    shape = spec.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jraise_mesh", default=None)


def active_mesh() -> Mesh | None:
    """The mesh set by the innermost `use_mesh`, else None (single-device behaviour)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | MeshSpec | str | None) -> Iterator[Mesh | None]:
    """Makes ``mesh`` (a Mesh, a spec, or None for no mesh) the active one inside the block."""
    if mesh is not None and not isinstance(mesh, Mesh):
        mesh = make_mesh(mesh)
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def row_shards(mesh: Mesh | None = None) -> int:
    """How many ways a batch's rows are split: data x fsdp (1 without a mesh)."""
    mesh = mesh or active_mesh()
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


# ----------------------------------------------------------------------------------------------
# Sharding rules


def _spec(dims: list) -> PartitionSpec:
    """A PartitionSpec without trailing Nones: XLA returns shardings in that canonical form, and
    jit's cache compares specs literally (P(None) != P() would recompile a step once)."""
    while dims and dims[-1] is None:
        dims = dims[:-1]
    return PartitionSpec(*dims)


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The `PartitionSpec` of a weight (or Adam moment) of ``shape``; see the module docstring."""
    dims: list = [None] * len(shape)
    if len(shape) < 2:
        return _spec(dims)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor > 1 and shape[-1] % tensor == 0:
        dims[-1] = "tensor"
    if fsdp > 1:
        free = [i for i in range(len(shape)) if dims[i] is None and shape[i] % fsdp == 0]
        if free:
            dims[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return _spec(dims)


def constrain_params(tree: Pytree, mesh: Mesh | None) -> Pytree:
    """Inside a jitted function: pins each leaf to its parameter sharding (no-op without a mesh).
    A train step's outputs then keep their inputs' placement; left to itself XLA may, e.g., shard
    a norm's gain over ``tensor``, and the next call would compile a second program."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, param_spec(tuple(x.shape), mesh))), tree)


def rows_spec(ndim: int, axis: int = 0) -> PartitionSpec:
    """Rows (dimension ``axis``) split over data x fsdp, the rest replicated."""
    dims: list = [None] * ndim
    dims[axis] = ROWS
    return _spec(dims)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# Placing host data on the mesh, reading results back


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a value every process holds in full (host or device).
    Each process reads only the slices that its own devices keep."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard on the devices
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _global_array(jax.random.key_data(x), NamedSharding(sharding.mesh, PartitionSpec()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(host, jax.Array) and jax.process_count() == 1:
        return jax.device_put(host, sharding)  # device-to-device, no host round trip
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(tree: Pytree, mesh: Mesh | None = None) -> Pytree:
    """``tree`` (weights, Adam state, ...) placed by the parameter rules; unchanged without a mesh.
    Typed PRNG keys (dropout streams) are replicated (by `_global_array`)."""
    mesh = mesh or active_mesh()
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _global_array(x, NamedSharding(mesh, param_spec(tuple(np.shape(x)), mesh))), tree)


def shard_replicated(tree: Pytree, mesh: Mesh | None = None) -> Pytree:
    """Every leaf of ``tree`` replicated on every device of the mesh; unchanged without one."""
    mesh = mesh or active_mesh()
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _global_array(x, replicated(mesh)), tree)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh | None = None, axis: int = 0,
                what: str = "batch") -> dict:
    """Each array of ``batch`` with its rows (dimension ``axis``) split over data x fsdp.

    Arrays with fewer than ``axis + 1`` dimensions are replicated. Without a mesh the batch is
    returned unchanged. A row count that ``data x fsdp`` does not divide is an error.
    """
    mesh = mesh or active_mesh()
    if mesh is None:
        return dict(batch)
    shards = row_shards(mesh)
    out = {}
    for name, x in batch.items():
        ndim = np.ndim(x)
        if ndim <= axis:
            out[name] = _global_array(x, replicated(mesh))
            continue
        rows = np.shape(x)[axis]
        if rows % shards:
            raise ValueError(f"{what}: {name} has {rows} rows, not a multiple of the mesh's data x fsdp = "
                             f"{shards} devices; choose a batch size (or group) divisible by {shards}")
        out[name] = _global_array(x, NamedSharding(mesh, rows_spec(ndim, axis)))
    return out


def shard_examples(tree: Pytree, mesh: Mesh | None = None) -> Pytree:
    """Per-example arrays (a device-resident pool, static features: leading dimension N) split
    over data x fsdp when the mesh divides N, else kept whole on every device."""
    mesh = mesh or active_mesh()
    if mesh is None:
        return tree

    def put(x):
        ndim = np.ndim(x)
        if ndim == 0 or np.shape(x)[0] % row_shards(mesh):
            return _global_array(x, replicated(mesh))
        return _global_array(x, NamedSharding(mesh, rows_spec(ndim)))

    return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) array as a numpy array, identical on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_host(tree: Pytree) -> Pytree:
    return jax.tree.map(to_host, tree)


# ----------------------------------------------------------------------------------------------
# Multi-host


ENV_COORDINATOR = ("JRAISE_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("JRAISE_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("JRAISE_PROCESS_ID", "JAX_PROCESS_ID")


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> dict | None:
    """The `jax.distributed.initialize` arguments from flags, else the environment; None when
    nothing asks for a multi-process run. A partial setting is an error naming what is missing."""
    coordinator = coordinator or _env(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env(ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-process run: {', '.join(missing)} not given (flags --coordinator, "
                         f"--num-processes, --process-id or the environment variables "
                         f"{ENV_COORDINATOR[0]}, {ENV_NUM_PROCESSES[0]}, {ENV_PROCESS_ID[0]})")
    settings = {"coordinator_address": str(coordinator), "num_processes": int(num_processes),
                "process_id": int(process_id)}
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(f"process_id {settings['process_id']} is outside 0..{settings['num_processes'] - 1}")
    return settings


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str = "gloo") -> bool:
    """Joins a multi-process JAX run when flags or the environment ask for one; returns whether it
    did. Must run before any other JAX call. On CPU, cross-process collectives use ``gloo``."""
    settings = distributed_settings(coordinator, num_processes, process_id)
    if settings is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**settings)
    return True


def is_writer() -> bool:
    """Whether this process writes shared outputs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
