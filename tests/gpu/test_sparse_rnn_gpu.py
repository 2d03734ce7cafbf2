"""GPU tests of the persistent sparse RNN kernel (run on the GPU machine, not in CI).

Run with a CPU backend beside the GPU, for the timeout check's host callback:
    JAX_PLATFORMS=cuda,cpu python -m pytest -o addopts="" tests/gpu/test_sparse_rnn_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp.kernels import sparse_rnn as sr

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
    pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated"),
]
_GATES = {"tanh": 1, "gru": 3, "lstm": 4}


def _problem(cell, hidden, batch, density, steps, seed):
    rng = np.random.default_rng(seed)
    g = _GATES[cell]
    w = rng.normal(size=(hidden, g * hidden)) * 0.5 / np.sqrt(density * hidden)
    weights = sr.SparseRecurrentWeights.prune(w, density, num_gates=g)
    x = jnp.asarray(rng.normal(size=(batch, steps, g * hidden)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, steps, hidden)), jnp.float32)
    return weights, x, h0, c0, ct


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize(
    "cell,hidden,batch,density",
    [
        ("lstm", 2304, 4, 0.3),
        ("lstm", 1152, 16, 0.05),
        ("tanh", 4096, 1, 0.1),
        ("gru", 512, 3, 0.2),
    ],
)
def test_persistent_long_sequence_matches_reference(cell, hidden, batch, density):
    weights, x, h0, c0, ct = _problem(cell, hidden, batch, density, 300, seed=hidden + batch)

    def loss(impl, x, h0, c0, values):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell=cell, c0=c0, implementation=impl
        )
        return jnp.sum(hs * ct), hs

    out = {}
    for impl in ("persistent", "reference"):
        grad = jax.jit(
            jax.value_and_grad(
                lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True
            )
        )
        (_, hs), grads = grad(x, h0, c0, weights.values)
        out[impl] = (hs, grads)
    # The default gathers from a float16 copy of h where its slabs are line-aligned (all four
    # cases here): h rounded to 2^-11 in the products.
    assert _rel(out["persistent"][0], out["reference"][0]) < 2e-3
    names = ("dx", "dh0", "dc0", "dvalues")
    for name, a, b in zip(names, out["persistent"][1], out["reference"][1], strict=True):
        if name == "dc0" and cell != "lstm":
            continue
        assert _rel(a, b) < 6e-3, name  # dvalues: TF32 product on GPU


# Kernel variants (kernels/sparse_rnn/NOTES.md), each against the reference over 300 steps,
# most promising first (a time-limited run gets through those).
# The plain backward (no dm copy, fold or preload): `sparse_rnn`'s default backward before
# session 8, which made the three levers the default. Every named variant starts from it.
_PLAIN = dict(dm_dtype="float32", backward_fold=False, backward_preload=False)
_VARIANTS = {
    "f32": dict(state_dtype="float32"),  # the float32-state fallback of the default (v3)
    "f16_pf": dict(state_dtype="float16", prefetch=True),
    "pf": dict(prefetch=True),
    "f16": dict(state_dtype="float16"),
    "f16_u2": dict(state_dtype="float16", unroll=2),
    "f16_u4": dict(state_dtype="float16", unroll=4),
    "f16_pf_nw8": dict(state_dtype="float16", prefetch=True, num_warps=8),
    "bf16_pf": dict(state_dtype="bfloat16", prefetch=True),
    # Backward variants (NOTES.md "Backward variants"): the default's forward, the backward
    # gathering a 16-bit copy of dm (float16 with a per-step scale, or bfloat16).
    "f16_u2_dm16": dict(state_dtype="float16", unroll=2, dm_dtype="float16"),
    "f16_u2_dmbf16": dict(state_dtype="float16", unroll=2, dm_dtype="bfloat16"),
    "f16_u2_fold": dict(state_dtype="float16", unroll=2, backward_fold=True),
    "f16_u2_dm16_fold": dict(
        state_dtype="float16", unroll=2, dm_dtype="float16", backward_fold=True
    ),
    "f16_u2_bwd3": dict(
        state_dtype="float16",
        unroll=2,
        dm_dtype="float16",
        backward_fold=True,
        backward_preload=True,
    ),
}


@pytest.mark.parametrize(
    "cell,hidden,batch,density", [("lstm", 2304, 4, 0.3), ("gru", 512, 3, 0.2)]
)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_persistent_variant_long_sequence_matches_reference(variant, cell, hidden, batch, density):
    weights, x, h0, c0, ct = _problem(cell, hidden, batch, density, 300, seed=hidden + batch)
    kw = _PLAIN | _VARIANTS[variant]

    def loss(impl, x, h0, c0, values):
        opts = dict(implementation=impl, **(kw if impl == "persistent" else {}))
        hs = sr.sparse_rnn(x, h0, weights.with_values(values), cell=cell, c0=c0, **opts)
        return jnp.sum(hs * ct), hs

    out = {}
    for impl in ("persistent", "reference"):
        grad = jax.jit(
            jax.value_and_grad(
                lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True
            )
        )
        (_, hs), grads = grad(x, h0, c0, weights.values)
        out[impl] = (hs, grads)
    # A 16-bit state copy rounds the gathered h: f16 2^-11, bf16 2^-8 relative per element.
    tol = {"float16": 2e-3, "bfloat16": 2e-2}.get(kw.get("state_dtype"), 1e-4)
    assert _rel(out["persistent"][0], out["reference"][0]) < tol
    names = ("dx", "dh0", "dc0", "dvalues")
    for name, a, b in zip(names, out["persistent"][1], out["reference"][1], strict=True):
        if name == "dc0" and cell != "lstm":
            continue
        assert _rel(a, b) < max(2e-3, 3 * tol), name


@pytest.mark.parametrize("loss_scale,last_only", [(1e-9, False), (1e7, False), (1e-6, True)])
def test_persistent_dm16_scale_follows_gradient_magnitude(loss_scale, last_only):
    # The float16 dm copy's per-step scale comes from a peak table read with volatile loads
    # after the stamps (persistent kernel only): gradients far outside float16's range, and
    # steps with g_t = 0 (`last_only`), against the float32-dm persistent backward.
    weights, x, h0, c0, ct = _problem("lstm", 2304, 4, 0.3, 64, seed=11)
    ct = ct * loss_scale
    if last_only:
        ct = ct.at[:, :-1].set(0.0)

    def grads(dm_dtype):
        def loss(x, h0, c0, values):
            hs = sr.sparse_rnn(
                x, h0, weights.with_values(values), cell="lstm", c0=c0,
                implementation="persistent", dm_dtype=dm_dtype,
            )  # fmt: skip
            return jnp.sum(hs * ct)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, h0, c0, weights.values)

    for name, a, b in zip(
        ("dx", "dh0", "dc0", "dvalues"), grads("float16"), grads("float32"), strict=True
    ):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert _rel(a, b) < 2e-3, name


def test_persistent_dm16_overflow_falls_back_to_float32(monkeypatch):
    # A scale target of 2^20 overflows float16 at every step: the backward runs again with the
    # float32 dm (40 steps: a shape no other test compiles, so the patched constant is traced).
    from jaxpp.kernels.sparse_rnn import _kernel

    monkeypatch.setattr(_kernel, "_DM_SCALE_EXP", 20)
    weights, x, h0, c0, ct = _problem("lstm", 2304, 4, 0.3, 40, seed=12)

    def grads(dm_dtype):
        def loss(x, values):
            hs = sr.sparse_rnn(
                x, h0, weights.with_values(values), cell="lstm", c0=c0,
                implementation="persistent", dm_dtype=dm_dtype,
            )  # fmt: skip
            return jnp.sum(hs * ct)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, weights.values)

    for a, b in zip(grads("float16"), grads("float32"), strict=True):
        assert _rel(a, b) < 1e-6


def test_persistent_spin_bound_exceeded_raises_timeout():
    weights, x, h0, c0, _ = _problem("lstm", 2304, 4, 0.3, 64, seed=1)
    try:
        jax.devices("cpu")
    except RuntimeError:
        pytest.skip("the timeout error is raised through a host callback: needs a CPU backend")
    with pytest.raises(Exception, match="timed out waiting"):
        hs = sr.sparse_rnn(
            x, h0, weights, cell="lstm", c0=c0, implementation="persistent", max_spins=1
        )
        jax.block_until_ready(hs)


def test_persistent_spin_bound_exceeded_poisons_output_with_nan():
    weights, x, h0, c0, _ = _problem("lstm", 2304, 4, 0.3, 64, seed=2)
    hs = sr.sparse_rnn(
        x, h0, weights, cell="lstm", c0=c0, implementation="persistent", max_spins=1,
        check_timeouts=False,
    )  # fmt: skip
    assert bool(jnp.all(jnp.isnan(hs)))


# The Mosaic GPU forward (implementation="mosaic"; kernels/sparse_rnn/NOTES.md): weights and a
# float16 h in shared memory; its backward is the Triton persistent one. First compiled here
# (the raw IR only lowers on a CPU), so the LSTM headline case comes first.
# `backward` is {} for `sparse_rnn`'s default backward or _PLAIN for the plain one; behind the
# Mosaic forward the backward runs the Triton kernel with the float32-state config.


@pytest.mark.parametrize(
    "cell,hidden,batch,density,slot_order,backward",
    [
        ("lstm", 2304, 4, 0.3, "conflict_free", _PLAIN),
        ("lstm", 2304, 4, 0.3, "packed", _PLAIN),
        ("tanh", 4096, 1, 0.1, "conflict_free", _PLAIN),
        ("gru", 512, 3, 0.2, "conflict_free", _PLAIN),
        ("lstm", 2304, 4, 0.3, "packed", {}),
        ("gru", 512, 3, 0.2, "packed", {}),
        ("tanh", 1152, 2, 0.1, "packed", {}),
    ],
    ids=lambda v: "plain" if v == _PLAIN else ("default" if v == {} else None),
)
def test_mosaic_long_sequence_matches_reference(cell, hidden, batch, density, slot_order, backward):
    weights, x, h0, c0, ct = _problem(cell, hidden, batch, density, 300, seed=hidden + batch)

    def loss(impl, x, h0, c0, values):
        opts = dict(implementation=impl)
        if impl == "mosaic":
            opts |= dict(slot_order=slot_order, **backward)
        hs = sr.sparse_rnn(x, h0, weights.with_values(values), cell=cell, c0=c0, **opts)
        return jnp.sum(hs * ct), hs

    out = {}
    for impl in ("mosaic", "reference"):
        grad = jax.jit(
            jax.value_and_grad(
                lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True
            )
        )
        (_, hs), grads = grad(x, h0, c0, weights.values)
        out[impl] = (hs, grads)
    assert _rel(out["mosaic"][0], out["reference"][0]) < 2e-3  # h rounded to float16
    names = ("dx", "dh0", "dc0", "dvalues")
    for name, a, b in zip(names, out["mosaic"][1], out["reference"][1], strict=True):
        if name == "dc0" and cell != "lstm":
            continue
        assert _rel(a, b) < 6e-3, name


def test_mosaic_spin_bound_exceeded_raises_or_poisons():
    weights, x, h0, c0, _ = _problem("lstm", 2304, 4, 0.3, 64, seed=3)
    hs = sr.sparse_rnn(
        x, h0, weights, cell="lstm", c0=c0, implementation="mosaic", max_spins=1,
        check_timeouts=False,
    )  # fmt: skip
    assert bool(jnp.all(jnp.isnan(hs)))
    try:
        jax.devices("cpu")
    except RuntimeError:
        return
    with pytest.raises(Exception, match="timed out waiting"):
        hs = sr.sparse_rnn(x, h0, weights, cell="lstm", c0=c0, implementation="mosaic", max_spins=1)
        jax.block_until_ready(hs)
