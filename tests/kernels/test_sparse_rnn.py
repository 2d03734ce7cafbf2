"""CPU tests of kernels/sparse_rnn: packing, the one-step Pallas kernel (interpret mode), the
custom VJP, the Flax layers and the input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels.sparse_rnn import _kernel

_GATES = {"tanh": 1, "gru": 3, "lstm": 4}


def _random_weights(rng, hidden, cell, density, *, num_blocks=4, dtype=jnp.bfloat16):
    g = _GATES[cell]
    w = rng.normal(size=(hidden, g * hidden)) * 0.5 / np.sqrt(density * hidden)
    return sr.SparseRecurrentWeights.prune(
        w, density, num_gates=g, num_blocks=num_blocks, dtype=dtype
    )


def _inputs(rng, batch, steps, hidden, cell):
    g = _GATES[cell]
    x = jnp.asarray(rng.normal(size=(batch, steps, g * hidden)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    return x, h0, c0


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bank_aware", [True, False])
def test_from_mask_random_mask_round_trips_to_dense(bank_aware):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(24, 72)).astype(np.float32)
    mask = rng.random(w.shape) < 0.3
    packed = sr.SparseRecurrentWeights.from_mask(
        w, mask, num_gates=3, num_blocks=6, dtype=jnp.float32, bank_aware=bank_aware
    )
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.where(mask, w, 0.0))
    assert packed.nnz == mask.sum()
    assert packed.slots % _kernel.CHUNK == 0


def test_transposed_layout_matches_dense_transpose():
    rng = np.random.default_rng(2)
    packed = _random_weights(rng, 20, "lstm", 0.3, num_blocks=5, dtype=jnp.float32)
    dense = np.asarray(packed.to_dense())  # (hidden, gates * hidden)
    t_vals = np.asarray(packed.transpose_values()).reshape(20, -1)
    t_rows = np.asarray(packed.transpose_rows).reshape(20, -1)
    rebuilt = np.zeros_like(dense)
    for j in range(20):
        np.add.at(rebuilt[j], t_rows[j], t_vals[j])
    np.testing.assert_allclose(rebuilt, dense)


def test_prune_keeps_largest_magnitudes_per_row():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 16)).astype(np.float32)
    packed = sr.SparseRecurrentWeights.prune(w, 0.25, num_gates=1, dtype=jnp.float32)
    dense = np.asarray(packed.to_dense())
    for r in range(16):
        kept = np.flatnonzero(dense[:, r])
        assert len(kept) == 4
        assert np.abs(w[kept, r]).min() >= np.sort(np.abs(w[:, r]))[-4]


def test_bank_aware_order_spreads_consecutive_slots_over_banks():
    mask = np.zeros((512, 512), bool)
    mask[0:256:32] = True  # 8 input units in bank 0 ...
    mask[257:264] = True  # ... and 7 in banks 1-7
    order = {}
    for bank_aware in (True, False):
        packed = sr.SparseRecurrentWeights.from_mask(
            mask.astype(np.float32), mask, num_gates=1, num_blocks=4, bank_aware=bank_aware
        )
        order[bank_aware] = np.asarray(packed.columns)[1, 0, 3, :8] % 32
    assert len(set(order[True].tolist())) == 8  # one slot per bank
    assert len(set(order[False].tolist())) == 1  # column order: all in bank 0


def test_pack_words_decode_to_values_and_columns():
    rng = np.random.default_rng(4)
    packed = _random_weights(rng, 16, "gru", 0.5, num_blocks=2)
    words = np.asarray(_kernel.pack(packed.values, packed.columns))
    cols = words & 0xFFFF
    vals = (words >> 16).astype(np.int16).view(jnp.bfloat16).astype(np.float32)
    blocks, gates, units, slots = packed.values.shape
    layout = (blocks, gates, slots // 32, units, 32)
    expect_cols = np.asarray(packed.columns).reshape(blocks, gates, units, -1, 32)
    expect_vals = np.asarray(packed.values, np.float32).reshape(blocks, gates, units, -1, 32)
    np.testing.assert_array_equal(cols.reshape(layout), expect_cols.transpose(0, 1, 3, 2, 4))
    np.testing.assert_array_equal(vals.reshape(layout), expect_vals.transpose(0, 1, 3, 2, 4))


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru"])
def test_step_kernel_forward_and_gradients_match_dense_masked_reference(cell):
    rng = np.random.default_rng({"tanh": 5, "lstm": 6, "gru": 7}[cell])
    hidden, batch, steps = 16, 3, 4
    weights = _random_weights(rng, hidden, cell, 0.3)
    x, h0, c0 = _inputs(rng, batch, steps, hidden, cell)
    ct = jnp.asarray(rng.normal(size=(batch, steps, hidden)), jnp.float32)

    def loss(impl):
        def f(x, h0, c0, values):
            hs = sr.sparse_rnn(
                x, h0, weights.with_values(values), cell=cell, c0=c0, implementation=impl
            )
            return jnp.sum(hs * ct), hs

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    (_, hs), grads = loss("step")(x, h0, c0, weights.values)
    # The reference differentiates through the dense matrix with plain autodiff.
    dense = weights.to_dense()

    def ref_loss(x, h0, c0, dense):
        hs = sr.sparse_rnn_reference(x, h0, dense, cell=cell, c0=c0)
        return jnp.sum(hs * ct), hs

    (_, hs_ref), (dx, dh0, dc0, ddense) = jax.value_and_grad(
        ref_loss, argnums=(0, 1, 2, 3), has_aux=True
    )(x, h0, c0, dense)
    assert _rel(hs, hs_ref) < 1e-5
    assert _rel(grads[0], dx) < 1e-5
    assert _rel(grads[1], dh0) < 1e-5
    if cell == "lstm":
        assert _rel(grads[2], dc0) < 1e-5
    # dW only at the non-zeros: the packed gradient equals the dense gradient sampled there.
    sampled = sr.SparseRecurrentWeights(
        values=grads[3].astype(jnp.float32),
        columns=weights.columns,
        valid=weights.valid,
        transpose_rows=weights.transpose_rows,
        transpose_source=weights.transpose_source,
        transpose_valid=weights.transpose_valid,
        hidden_size=hidden,
        num_gates=_GATES[cell],
    ).to_dense()
    mask = np.asarray(dense) != 0
    assert _rel(sampled, jnp.where(mask, ddense, 0.0)) < 1e-2  # bf16 gradient values
    assert np.all(np.asarray(sampled)[~mask] == 0)
    assert np.all(np.asarray(grads[3])[~np.asarray(weights.valid)] == 0)


def test_reference_implementation_matches_step_kernel_with_batch_one():
    rng = np.random.default_rng(8)
    weights = _random_weights(rng, 32, "tanh", 0.1, num_blocks=2)
    x, h0, _ = _inputs(rng, 1, 4, 32, "tanh")
    out = sr.sparse_rnn(x, h0, weights, cell="tanh", implementation="step")
    ref = sr.sparse_rnn(x, h0, weights, cell="tanh", implementation="reference")
    assert _rel(out, ref) < 1e-5


def test_flax_lstm_layer_gradients_match_reference_path():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    layer = sr.SparseLSTM(hidden_size=8, density=0.25, num_blocks=2)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["recurrent_values"].shape[:3] == (2, 4, 4)

    def loss(params, implementation):
        model = sr.SparseLSTM(
            hidden_size=8, density=0.25, num_blocks=2, implementation=implementation
        )
        out = model.apply({"params": params, "sparsity": variables["sparsity"]}, x)
        return jnp.sum(jnp.sin(out))

    g_step = jax.grad(loss)(variables["params"], "step")
    g_ref = jax.grad(loss)(variables["params"], "reference")
    for name in ("input_kernel", "bias"):
        assert _rel(g_step[name], g_ref[name]) < 1e-2, name
    # The kernel reads bf16-rounded recurrent values; compare with a tolerance for that.
    assert _rel(g_step["recurrent_values"], g_ref["recurrent_values"]) < 3e-2


def test_flax_gru_layer_runs_and_prunes_to_density():
    x = jnp.ones((1, 3, 5))
    layer = sr.SparseGRU(hidden_size=8, density=0.5, num_blocks=2)
    variables = layer.init(jax.random.key(1), x)
    assert int(variables["sparsity"]["pattern"]["valid"].sum()) == 8 * 24 // 2
    assert layer.apply(variables, x).shape == (1, 3, 8)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_prune_density_out_of_range_raises(density):
    with pytest.raises(ValueError, match="density=.* is outside"):
        sr.SparseRecurrentWeights.prune(np.ones((8, 8)), density, num_gates=1)


def test_prune_shape_not_matching_gates_raises():
    with pytest.raises(ValueError, match="does not match num_gates=4"):
        sr.SparseRecurrentWeights.prune(np.ones((8, 24)), 0.5, num_gates=4)


def test_from_mask_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        sr.SparseRecurrentWeights.from_mask(np.ones((4, 4)), np.ones((4, 5), bool), num_gates=1)


def test_from_mask_blocks_not_dividing_hidden_raises():
    with pytest.raises(ValueError, match="does not divide hidden=12"):
        sr.SparseRecurrentWeights.prune(np.ones((12, 12)), 0.5, num_gates=1, num_blocks=5)


def test_sparse_rnn_x_proj_shape_mismatch_raises():
    w = sr.SparseRecurrentWeights.prune(np.ones((8, 32)), 0.5, num_gates=4)
    with pytest.raises(ValueError, match="x_proj shape"):
        sr.sparse_rnn(jnp.ones((2, 3, 30)), jnp.zeros((2, 8)), w, cell="lstm")


def test_sparse_rnn_cell_gate_mismatch_raises():
    w = sr.SparseRecurrentWeights.prune(np.ones((8, 32)), 0.5, num_gates=4)
    with pytest.raises(ValueError, match="needs 1"):
        sr.sparse_rnn(jnp.ones((2, 3, 32)), jnp.zeros((2, 8)), w, cell="tanh")


def test_sparse_rnn_h0_shape_mismatch_raises():
    w = sr.SparseRecurrentWeights.prune(np.ones((8, 8)), 0.5, num_gates=1)
    with pytest.raises(ValueError, match="h0 shape"):
        sr.sparse_rnn(jnp.ones((2, 3, 8)), jnp.zeros((3, 8)), w, cell="tanh")


def test_sparse_rnn_unknown_cell_and_implementation_raise():
    w = sr.SparseRecurrentWeights.prune(np.ones((8, 8)), 0.5, num_gates=1)
    x, h0 = jnp.ones((1, 2, 8)), jnp.zeros((1, 8))
    with pytest.raises(ValueError, match="cell='rnn' is not one of"):
        sr.sparse_rnn(x, h0, w, cell="rnn")
    with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
        sr.sparse_rnn(x, h0, w, cell="tanh", implementation="cuda")


def test_sparse_rnn_hidden_too_large_for_chip_raises():
    hidden = 1024  # LSTM, 160 kept per row on 8 blocks: 4 * 128 * 160 slots per block > 65536
    rng = np.random.default_rng(10)
    mask = np.zeros((hidden, 4 * hidden), bool)
    mask[:160] = True
    w = sr.SparseRecurrentWeights.from_mask(
        rng.normal(size=mask.shape).astype(np.float32), mask, num_gates=4, num_blocks=8
    )
    x, h0 = jnp.ones((1, 2, 4 * hidden)), jnp.zeros((1, hidden))
    with pytest.raises(ValueError, match="more than the kernel holds on chip"):
        sr.sparse_rnn(x, h0, w, cell="lstm", implementation="step")


def test_sparse_rnn_persistent_on_cpu_raises_with_fix():
    w = jax.random.normal(jax.random.key(0), (16, 16))
    weights = sr.SparseRecurrentWeights.prune(w, 0.5, num_gates=1)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))  # [batch, time, hidden]
    with pytest.raises(ValueError, match="implementation='step'"):
        sr.sparse_rnn(x, jnp.zeros((2, 16)), weights, cell="tanh", implementation="persistent")
