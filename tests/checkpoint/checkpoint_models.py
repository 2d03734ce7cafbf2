"""A tiny residual MLP train step (params, AdamW state, step counter) for the checkpoint tests.

The same 4 layers can be cut into 4 stages, 2 stages, or run by plain `jax.jit`, so a
checkpoint of one layout restores into another (the param tree does not depend on it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpp

WIDTH = 8
NUM_LAYERS = 4
NUM_MICROBATCHES = 4
MB_SIZE = 2


def init_state(key: jax.Array, *, num_layers: int = NUM_LAYERS, width: int = WIDTH) -> dict:
    """Fresh random params, the optimizer state for them, and step 0."""
    keys = iter(jax.random.split(key, 2 + 2 * num_layers))
    params = {
        "embed": jax.random.normal(next(keys), (width, width)) / np.sqrt(width),
        "layers": [
            {
                "w": jax.random.normal(next(keys), (width, width)) / np.sqrt(width),
                "b": 0.1 * jax.random.normal(next(keys), (width,)),
            }
            for _ in range(num_layers)
        ],
        "head": jax.random.normal(next(keys), (width, width)) / np.sqrt(width),
    }
    return {"params": params, "opt_state": make_optimizer().init(params), "step": jnp.int32(0)}


def make_optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3))


def batch_at(index: int, *, seed: int = 1, width: int = WIDTH) -> dict:
    """The batch at a data position: fresh random values, a pure function of the index."""
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
    shape = (NUM_MICROBATCHES, MB_SIZE, width)
    return {"x": jax.random.normal(kx, shape), "y": jax.random.normal(ky, shape)}


def _loss(params, batch, *, layers_per_stage):
    h = jnp.tanh(batch["x"] @ params["embed"])
    layer = 0
    for stage, count in enumerate(layers_per_stage):
        for _ in range(count):
            p = params["layers"][layer]
            h = h + jnp.tanh(h @ p["w"] + p["b"])
            layer += 1
        if stage < len(layers_per_stage) - 1:
            h = jaxpp.mark_stage_end(h)
    return jaxpp.mark_stage_end(jnp.mean((h @ params["head"] - batch["y"]) ** 2))


def _train_step(state, batch, *, num_stages):
    layers_per_stage = (NUM_LAYERS // num_stages,) * num_stages
    loss = functools.partial(_loss, layers_per_stage=layers_per_stage)
    params = state["params"]
    losses, grads = jaxpp.treduce(
        lambda mb: jax.value_and_grad(loss)(params, mb), batch, schedule=jaxpp.Std1F1B(num_stages)
    )
    grads = jax.tree.map(lambda g: g / losses.shape[0], grads)
    updates, opt_state = make_optimizer().update(grads, state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }
    return new_state, losses


def make_step(layout: int | str):
    """`layout` stages pipelined with `mpmd_jit_with_loop` (1F1B), or "jit" for plain jax.jit."""
    if layout == "jit":
        return jax.jit(functools.partial(_train_step, num_stages=2))
    devices = np.array(jax.devices()[:layout]).reshape(layout, 1)
    mesh = jaxpp.MpmdMesh(jax.sharding.Mesh(devices, ("stages", "data")), "stages")
    return jaxpp.mpmd_jit_with_loop(
        functools.partial(_train_step, num_stages=layout), mpmd_mesh=mesh
    )


def train(step, state: dict, start: int, num_steps: int) -> tuple[dict, list]:
    """`num_steps` steps from data position `start`; the state and each step's losses."""
    losses = []
    for index in range(start, start + num_steps):
        state, step_losses = step(state, batch_at(index))
        losses.append(step_losses)
    return state, losses


def assert_trees_equal(actual, expected, *, what: str) -> None:
    """Same structure and bit-for-bit equal leaves; names the first leaf that differs."""
    a_flat, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"{what}: structures differ: {a_tree} vs {e_tree}"
    for (path, a), e in zip(a_flat, e_leaves, strict=True):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(e), err_msg=f"{what}: {jax.tree_util.keystr(path)}"
        )
