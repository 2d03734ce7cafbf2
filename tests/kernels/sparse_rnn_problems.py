"""What the sparse RNN tests share: random problems, the relative error, CUDA lowering checks."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels.sparse_rnn import _kernel

GATES = {"tanh": 1, "gru": 3, "lstm": 4}


def problem(cell, hidden, batch, steps, density, seed, num_blocks=4):
    """`(weights, x, h0, c0, ct)`: pruned weights scaled so the recurrence neither dies nor
    saturates, input projections, initial states and a cotangent for every output."""
    rng = np.random.default_rng(seed)
    g = GATES[cell]
    w = rng.normal(size=(hidden, g * hidden)) * 0.5 / np.sqrt(density * hidden)
    weights = sr.SparseRecurrentWeights.prune(w, density, num_gates=g, num_blocks=num_blocks)
    x = jnp.asarray(rng.normal(size=(batch, steps, g * hidden)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, steps, hidden)), jnp.float32)
    return weights, x, h0, c0, ct


def rel(a, b) -> float:
    """`|a - b| / |b|` in float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def export_cuda(fn, *args) -> str:
    """The MLIR of `jax.jit(fn)(*args)` lowered for CUDA on an abstract H100 (no GPU needed)."""
    dev = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    return exported.mlir_module()


def export_backward(cfg: _kernel.KernelConfig) -> str:
    """`_kernel.backward_persistent` of `cfg` lowered for CUDA (`export_cuda`)."""
    f32, spec = jnp.float32, jax.ShapeDtypeStruct
    steps, hidden, batch = cfg.steps, cfg.hidden, cfg.batch
    gh = cfg.gates * hidden
    state = spec(((steps + 1) * hidden, batch), f32)
    twords = spec((cfg.blocks * 4 * cfg.units, _kernel.CHUNK), jnp.int32)
    return export_cuda(
        lambda g, x, m, h, c, tw: _kernel.backward_persistent(cfg, g, x, m, h, c, tw),
        spec((steps * hidden, batch), f32), spec((steps * gh, batch), f32),
        spec((steps * gh, batch), f32), state, state, twords,
    )  # fmt: skip
