"""CPU tests of the sparse RNN backward's options (`dm_dtype`, `backward_fold`,
`backward_preload`): the math through the one-step kernel in interpret mode (forward and every
gradient against the dense reference and against the plain kernel, fresh random inputs, all
cells, gradients from tiny to huge), the float16 copy's per-step scale, the float32 fallback on
overflow, the folded small row groups, the persistent backward itself with one block, and that
it lowers for CUDA with each option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sparse_rnn_problems import GATES, export_backward, export_cuda, problem, rel

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels.sparse_rnn import _kernel

pytestmark = pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated")


def _grads(impl, weights, cell, x, h0, c0, ct, **kw):
    def loss(x, h0, c0, values):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell=cell, c0=c0, implementation=impl, **kw
        )
        return jnp.sum(hs * ct), hs

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, hs), grads = grad(x, h0, c0, weights.values)
    return hs, grads


def _names(cell):
    return [n for n in ("dx", "dh0", "dc0", "dvalues") if n != "dc0" or cell == "lstm"]


# Tolerances of a 16-bit dm copy, relative (norms) to the float32-dm kernel: each gathered dm
# element is rounded once per step (float16: unit roundoff 2^-11 = 4.9e-4; bfloat16: 2^-8 =
# 3.9e-3); the sums over ~100 random-signed terms keep that relative size, and the contractive
# recurrence (gain 0.5) keeps it from growing over the steps. 4x the unit roundoff as margin.
_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.mark.parametrize(
    "cell,dm_dtype",
    [("lstm", "float16"), ("gru", "float16"), ("tanh", "float16"), ("lstm", "bfloat16")],
)
def test_dm_copy_step_kernel_matches_float32_dm_and_reference(cell, dm_dtype):
    # Transposed lists of 1-4 chunks (hidden 32, density 0.875: 28 entries per column and gate),
    # 16 units per block: one row group.
    weights, x, h0, c0, ct = problem(cell, 32, 2, 2, 0.875, seed=len(cell) + 10, num_blocks=2)
    hs, grads = _grads("step", weights, cell, x, h0, c0, ct, dm_dtype=dm_dtype)
    hs32, grads32 = _grads("step", weights, cell, x, h0, c0, ct)
    hs_ref, grads_ref = _grads("reference", weights, cell, x, h0, c0, ct)
    assert rel(hs, hs32) == 0.0  # the forward is untouched
    for name, a, b, r in zip(
        ("dx", "dh0", "dc0", "dvalues"), grads, grads32, grads_ref, strict=True
    ):
        if name not in _names(cell):
            continue
        assert 0.0 < rel(a, b) < _TOL[dm_dtype], name  # > 0: the copy really was gathered
        if name != "dvalues":  # the kernels read bf16-rounded values; reference: float32
            assert rel(a, r) < _TOL[dm_dtype] + 1e-4, name


@pytest.mark.parametrize(
    "cell,hidden,blocks,dm_dtype",
    [
        ("lstm", 36, 2, "float16"),  # 18 units = 16 + 2 (fold 8): 5 chunks, masked tail
        ("gru", 48, 4, "float32"),  # 12 units = 8 + 4 (fold 2 and 4): 5 chunks, 3 and 2 iterations
        ("tanh", 20, 4, "float32"),  # 5 units = 4 + 1 (fold 4 and 16)
    ],
)
def test_backward_fold_step_kernel_matches_unfolded_and_reference(cell, hidden, blocks, dm_dtype):
    weights, x, h0, c0, ct = problem(cell, hidden, 2, 2, 0.875, seed=hidden, num_blocks=blocks)
    # unroll 2: the 16-unit group's loop takes 2 chunks per iteration and a tail (LSTM).
    kw = dict(dm_dtype=dm_dtype, unroll=2)
    _, grads = _grads("step", weights, cell, x, h0, c0, ct, backward_fold=True, **kw)
    _, grads_plain = _grads("step", weights, cell, x, h0, c0, ct, **kw)
    _, grads_ref = _grads("reference", weights, cell, x, h0, c0, ct)
    tol = 1e-5 if dm_dtype == "float32" else _TOL[dm_dtype]
    for name, a, b, r in zip(
        ("dx", "dh0", "dc0", "dvalues"), grads, grads_plain, grads_ref, strict=True
    ):
        if name not in _names(cell):
            continue
        assert rel(a, b) < 1e-5 + (tol if dm_dtype != "float32" else 0.0), name
        if name != "dvalues":
            assert rel(a, r) < tol + 1e-5, name


@pytest.mark.parametrize("loss_scale,last_only", [(1e-9, False), (1e7, False), (1e-6, True)])
def test_float16_dm_scale_follows_gradient_magnitude(loss_scale, last_only):
    # Unscaled float16 would flush dm ~ 1e-10 to zero (smallest subnormal 6e-8) and overflow at
    # 65504; with the per-step scale the relative error is that of loss_scale = 1. `last_only`:
    # the loss sees only the last step, so g_t = 0 before it and the scale comes from the
    # previous step's dm peaks alone.
    cell = "lstm"
    weights, x, h0, c0, ct = problem(cell, 32, 2, 3, 0.875, seed=7, num_blocks=2)
    ct = ct * loss_scale
    if last_only:
        ct = ct.at[:, :-1].set(0.0)
    _, grads = _grads("step", weights, cell, x, h0, c0, ct, dm_dtype="float16")
    _, grads32 = _grads("step", weights, cell, x, h0, c0, ct)
    for name, a, b in zip(("dx", "dh0", "dc0", "dvalues"), grads, grads32, strict=True):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert rel(a, b) < _TOL["float16"], name


def test_float16_dm_overflow_falls_back_to_float32(monkeypatch):
    # A scale target of 2^20 makes every step's scaled dm overflow float16: the kernel counts
    # it and sparse_rnn's backward runs again with the float32 dm, so the gradients are exact.
    # (hidden 48: a shape no other test traces, so the patched constant is not cached away.)
    monkeypatch.setattr(_kernel, "_DM_SCALE_EXP", 20)
    cell = "tanh"
    weights, x, h0, c0, ct = problem(cell, 48, 2, 2, 0.875, seed=3, num_blocks=3)
    _, grads = _grads("step", weights, cell, x, h0, c0, ct, dm_dtype="float16")
    _, grads32 = _grads("step", weights, cell, x, h0, c0, ct)
    for name, a, b in zip(("dx", "dh0", "dvalues"), (grads[0], grads[1], grads[3]),
                          (grads32[0], grads32[1], grads32[3]), strict=True):  # fmt: skip
        assert rel(a, b) < 1e-6, name


def test_float16_dm_overflow_is_counted():
    cfg = _kernel.KernelConfig(
        cell="tanh", hidden=32, gates=1, blocks=2, units=16, slots=32, transpose_slots=32,
        batch=2, steps=2, interpret=True, dm_dtype="float16",
    )  # fmt: skip
    rng = np.random.default_rng(5)
    f32 = jnp.float32
    g = jnp.asarray(rng.normal(size=(2 * 32, 2)), f32)
    x = jnp.asarray(rng.normal(size=(2 * 32, 2)), f32) * 0.1
    m = jnp.zeros((2 * 32, 2), f32)
    hbuf = jnp.asarray(rng.normal(size=(3 * 32, 2)), f32)
    # One transposed entry per column, of value 2^15: dm_0 ~ 32768 |dm_1|, past the 4096-8192x
    # headroom of one step (the scaled peak of the previous step sits in [2^(K-1), 2^K)).
    vals = jnp.zeros((2, 1, 16, 32), jnp.bfloat16).at[..., 0].set(32768.0)
    rows = jnp.broadcast_to(jnp.arange(32).reshape(2, 1, 16, 1), (2, 1, 16, 32))
    twords = _kernel.pack(vals, rows)
    *_, overflows = _kernel.backward_steps(cfg, g, x, m, hbuf, hbuf, twords)
    assert int(jnp.sum(overflows)) > 0
    *_, none = _kernel.backward_steps(cfg, g, x, m, hbuf, hbuf, twords * 0)
    assert int(jnp.sum(none)) == 0


def test_dm_scale_is_a_power_of_two_with_the_peak_below_2_to_k():
    peaks = jnp.asarray([1e-25, 3e-9, 0.7, 1.0, 1.5, 65504.0, 3e20], jnp.float32)
    scale, inv = jax.vmap(_kernel.dm_scale)(peaks)
    k = _kernel._DM_SCALE_EXP
    scaled = np.asarray(peaks * scale)
    assert np.all((scaled >= 2.0 ** (k - 1)) & (scaled < 2.0**k))
    assert np.all(np.asarray(scale * inv) == 1.0)
    assert np.all(np.log2(np.asarray(scale)) == np.round(np.log2(np.asarray(scale))))
    zero, inv0 = _kernel.dm_scale(jnp.float32(0.0))
    assert float(zero) == 2.0**100 and float(inv0) == 2.0**-100


def test_dm_dtype_unknown_raises_with_choices():
    weights, x, h0, _, _ = problem("tanh", 16, 1, 2, 0.5, seed=0, num_blocks=1)
    with pytest.raises(ValueError, match="dm_dtype='int8' is not one of"):
        sr.sparse_rnn(x, h0, weights, cell="tanh", implementation="step", dm_dtype="int8")


def test_dm_dtype_with_slabs_not_line_aligned_raises(monkeypatch):
    from jaxpp.kernels.sparse_rnn import _api

    monkeypatch.setattr(_api.jax, "default_backend", lambda: "gpu")
    weights, x, h0, _, _ = problem("tanh", 24, 1, 2, 0.5, seed=1, num_blocks=3)
    with pytest.raises(ValueError, match="192-byte dm slabs"):  # 24 x batch padded to 4 x 2
        sr.sparse_rnn(
            x, h0, weights, cell="tanh", implementation="persistent", state_dtype="float32",
            dm_dtype="float16",
        )  # fmt: skip


@pytest.mark.parametrize(
    "cell,dm_dtype,unroll,fold",
    [
        ("lstm", "float16", 1, False),
        ("lstm", "bfloat16", 1, False),
        ("gru", "float16", 2, False),
        ("tanh", "float16", 1, False),
        ("lstm", "float32", 1, True),
        ("lstm", "float16", 2, True),
        ("gru", "float16", 2, "preload"),
    ],
)
def test_persistent_backward_options_lower_for_cuda(cell, dm_dtype, unroll, fold):
    # 18 units per block (16 + 2, as at hidden 2304 on 128 blocks): the fold has a group to fold.
    hidden, batch, steps, blocks = 288, 4, 8, 16
    gates = GATES[cell]
    units = hidden // blocks
    cfg = _kernel.KernelConfig(
        cell=cell, hidden=hidden, gates=gates, blocks=blocks, units=units, slots=96,
        transpose_slots=128, batch=batch, steps=steps, num_warps=16, unroll=unroll,
        dm_dtype=dm_dtype, backward_fold=bool(fold), backward_preload=fold == "preload",
    )  # fmt: skip
    assert len(cfg.folded_groups) == bool(fold)
    assert "sparse_rnn_backward_persistent" in export_backward(cfg)


@pytest.mark.parametrize("implementation", ["persistent", "mosaic"])
def test_api_gradient_with_backward_options_lowers_for_cuda(monkeypatch, implementation):
    # Through `sparse_rnn`: the float16 dm copy with its float32 fallback (`lax.cond`) and the
    # folded 2-unit group (18 units per block), after either forward kernel.
    from jaxpp.kernels.sparse_rnn import _api

    monkeypatch.setattr(_api.jax, "default_backend", lambda: "gpu")
    weights, _, _, _, _ = problem("lstm", 288, 4, 8, 0.3, seed=5, num_blocks=16)

    def loss(x, h0, c0, values):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell="lstm", c0=c0,
            implementation=implementation, check_timeouts=False, dm_dtype="float16",
            backward_fold=True, backward_preload=True,
        )  # fmt: skip
        return jnp.sum(hs)

    spec = jax.ShapeDtypeStruct
    args = (
        spec((4, 8, 4 * 288), jnp.float32), spec((4, 288), jnp.float32),
        spec((4, 288), jnp.float32), spec(weights.values.shape, weights.values.dtype),
    )  # fmt: skip
    text = export_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
    assert "sparse_rnn_backward_persistent" in text
    assert "stablehlo.case" in text  # the float32 fallback's branch


@pytest.mark.parametrize(
    "cell,options",
    [
        ("lstm", {}),
        ("lstm", dict(dm_dtype="float16")),
        ("lstm", dict(dm_dtype="float16", backward_fold=True, unroll=2)),
        ("gru", dict(dm_dtype="bfloat16", backward_fold=True)),
        ("lstm", dict(dm_dtype="float16", backward_fold=True, backward_preload=True)),
        ("gru", dict(backward_preload=True)),
        ("tanh", dict(dm_dtype="float16", overflow=True)),  # scale target 2^20: all overflow
    ],
)
def test_persistent_backward_one_block_in_interpret_mode_matches_step_kernel(
    monkeypatch, cell, options
):
    # The persistent kernel itself (its slab offsets, the 16-bit copy, the peak table and the
    # carried scale) in interpret mode: with one block every wait is on the block's own stamp,
    # which it published the step before, so nothing spins; the stamp is stored plainly
    # (interpret mode has no atomic exchange). 18 units: groups 16 + 2, the fold has one.
    from jax.experimental import pallas as pl

    def publish(stamps_ref, p, value):
        stamps_ref[pl.ds(p, 1)] = jnp.full((1,), value, jnp.int32)

    monkeypatch.setattr(_kernel, "_publish", publish)
    options = dict(options)
    overflow = options.pop("overflow", False)
    if overflow:
        monkeypatch.setattr(_kernel, "_DM_SCALE_EXP", 20)
    hidden, batch, steps, gates = 18, 4, 3, GATES[cell]
    weights, *_ = problem(cell, hidden, 1, 1, 0.8, seed=21, num_blocks=1)
    cfg = _kernel.KernelConfig(
        cell=cell, hidden=hidden, gates=gates, blocks=1, units=hidden,
        slots=weights.values.shape[3], transpose_slots=weights.transpose_rows.shape[2],
        batch=batch, steps=steps, num_warps=4, interpret=True, max_spins=4, **options,
    )  # fmt: skip
    rng = np.random.default_rng(22)

    def rand(rows, scale=1.0):
        return jnp.asarray(rng.normal(size=(rows, batch)) * scale, jnp.float32)

    gh = gates * hidden
    args = (rand(steps * hidden), rand(steps * gh), rand(steps * gh))
    args += (rand((steps + 1) * hidden, 0.5), rand((steps + 1) * hidden, 0.5))
    flat = weights.values.astype(jnp.bfloat16).ravel()[weights.transpose_source]
    t_vals = jnp.where(weights.transpose_valid, flat, jnp.zeros((), flat.dtype))
    twords = _kernel.pack(t_vals[:, None], weights.transpose_rows[:, None])
    persistent = _kernel.backward_persistent(cfg, *args, twords)
    step = _kernel.backward_steps(cfg, *args, twords)
    if overflow:  # the same count per block (from the first overflow on the values are inf/NaN)
        assert int(persistent[5][0]) == int(step[5][0]) >= 1
        return
    for name, a, b in zip(("dm", "dx", "dc0", "dh_direct0"), persistent, step, strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    assert int(persistent[4][0]) == 0 and int(persistent[5][0]) == 0  # timeouts, overflows
