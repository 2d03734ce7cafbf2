"""Small models and train steps shared by the pipeline tests (plain JAX + optax)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpp

WIDTH = 8


def init_params(key, layers_per_stage, *, tied=False, width=WIDTH):
    """Per-layer weights; `layers_per_stage` like (1, 2, 1, 1) gives uneven stages."""
    keys = iter(jax.random.split(key, 4 + 2 * sum(layers_per_stage)))
    params = {
        "embed": jax.random.normal(next(keys), (width, width)) / np.sqrt(width),
        "layers": [
            {
                "w": jax.random.normal(next(keys), (width, width)) / np.sqrt(width),
                "b": 0.1 * jax.random.normal(next(keys), (width,)),
            }
            for _ in range(sum(layers_per_stage))
        ],
    }
    if not tied:
        params["head"] = jax.random.normal(next(keys), (width, width)) / np.sqrt(width)
    return params


def loss_fn(params, batch, *, layers_per_stage, tied=False, skip=False):
    """Mean squared error of a residual MLP cut into stages with mark_stage_end."""
    h = jnp.tanh(batch["x"] @ params["embed"])
    first = h
    layer = 0
    for stage, count in enumerate(layers_per_stage):
        for _ in range(count):
            p = params["layers"][layer]
            h = h + jnp.tanh(h @ p["w"] + p["b"])
            layer += 1
        if skip and stage == len(layers_per_stage) - 1:
            h = h + first  # a skip connection from stage 0 to the last stage
        if stage < len(layers_per_stage) - 1:
            h = jaxpp.mark_stage_end(h)
    head = params["embed"].T if tied else params["head"]
    out = h @ head
    return jaxpp.mark_stage_end(jnp.mean((out - batch["y"]) ** 2))


def make_optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3))


def train_step(state, batch, *, schedule, loss):
    params, opt_state = state
    losses, grads = jaxpp.treduce(
        lambda mb: jax.value_and_grad(loss)(params, mb), batch, schedule=schedule
    )
    num_mb = losses.shape[0]
    grads = jax.tree.map(lambda g: g / num_mb, grads)
    updates, opt_state = make_optimizer().update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), losses


def make_problem(key, *, layers_per_stage, num_microbatches, tied=False, skip=False, mb_size=4):
    """Fresh random params, optimizer state, batch and the step function."""
    k_params, k_x, k_y = jax.random.split(key, 3)
    params = init_params(k_params, layers_per_stage, tied=tied)
    state = (params, make_optimizer().init(params))
    batch = {
        "x": jax.random.normal(k_x, (num_microbatches, mb_size, WIDTH)),
        "y": jax.random.normal(k_y, (num_microbatches, mb_size, WIDTH)),
    }
    loss = functools.partial(loss_fn, layers_per_stage=layers_per_stage, tied=tied, skip=skip)
    return state, batch, loss


def assert_trees_close(actual, expected, *, rtol=2e-5, atol=2e-6, what=""):
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"{what}: structures differ: {a_tree} vs {e_tree}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=f"{what} leaf {i}"
        )
