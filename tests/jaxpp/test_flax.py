"""jaxpp.flax: pipelined models equal the plain ones (values and grads) and carry S+S markers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpp.flax as jflax
from jaxpp.models import gpt, gpt_nnx

VOCAB = 16
TOKENS_SHAPE = (2, 9)  # [batch, seq_len + 1]


def _config(**overrides) -> gpt.GPTConfig:
    base = dict(vocab_size=VOCAB, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2)
    return gpt.GPTConfig(**(base | overrides))


def _tokens(seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), TOKENS_SHAPE, 0, VOCAB)


def _marker_counts(jaxpr) -> dict[str, int]:
    counts = {"forward": 0, "backward": 0}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "jaxpp_stage_end":
            counts[str(eqn.params["direction"])] += 1
    return counts


def _assert_trees_close(actual, expected, *, atol=2e-5) -> None:
    """float32 tolerance: XLA fuses a split scan differently from the whole one."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=atol)


# --- linen ------------------------------------------------------------------------------

LINEN_CASES = {
    "unrolled": dict(),
    "unrolled-remat-tied": dict(remat=True, tie_embeddings=True, norm="layer"),
    "scan": dict(scan_layers=True),
    "scan-remat": dict(scan_layers=True, remat=True),
}
LAYOUTS = (("E tt|tt L", 2), ("E t|t|t|t L", 4), ("E | tttt | L", 3), ("E ttt|t L", 2))
SPLIT_LAYOUTS = ("E | t|ttt | L",)  # uneven, with embedding-only and head-only stages


def _init_params(model: nn.Module, key: jax.Array, tokens: jax.Array):
    return model.init(key, tokens[:, :-1])["params"]


@pytest.mark.parametrize("case", sorted(LINEN_CASES))
def test_pipeline_linen_every_layout_has_s_forward_and_s_backward_markers(case):
    model = gpt.GPT(_config(**LINEN_CASES[case]))
    batch = {"tokens": _tokens(1)}
    params = jax.eval_shape(
        functools.partial(_init_params, model), jax.random.key(2), batch["tokens"]
    )
    for layout, num_stages in LAYOUTS:
        marked = jax.value_and_grad(gpt.make_loss_fn(jflax.pipeline(model, layout=layout)))
        counts = _marker_counts(jax.make_jaxpr(marked)(params, batch).jaxpr)
        assert counts == {"forward": num_stages, "backward": num_stages}, layout


@pytest.mark.parametrize("case", ["scan"])  # unrolled: see the compact-model test
def test_pipeline_linen_same_loss_and_grads_as_plain_model(case):
    model = gpt.GPT(_config(**LINEN_CASES[case]))
    variants = (model, *(jflax.pipeline(model, layout=text) for text in SPLIT_LAYOUTS))

    def all_variants(key, batch):  # one compilation: init, the plain model and the layouts
        params = _init_params(model, key, batch["tokens"])
        return [jax.value_and_grad(gpt.make_loss_fn(m))(params, batch) for m in variants]

    results = jax.jit(all_variants)(jax.random.key(2), {"tokens": _tokens(1)})
    (expected_loss, expected_grads), *results = results
    for text, (loss, grads) in zip(SPLIT_LAYOUTS, results, strict=True):
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=text)
        _assert_trees_close(grads, expected_grads)


def test_pipeline_linen_num_stages_uneven_split_earlier_stages_take_extra():
    model = gpt.GPT(_config(num_layers=5))
    tokens = _tokens(3)[:, :-1]
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    jaxpr = jax.make_jaxpr(jflax.pipeline(model, num_stages=2).apply)(variables, tokens).jaxpr
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    markers = [i for i, name in enumerate(names) if name == "jaxpp_stage_end"]
    assert len(markers) == 2 and markers[1] == len(names) - 1
    # Each block has 7 dense matmuls (q, k, v, out, up, down) plus attention's; count the
    # blocks by their 2 norms' rsqrt: 3 blocks (6 rsqrt) before the first marker, 2 after.
    rsqrt_before = names[: markers[0]].count("rsqrt")
    rsqrt_after = names[markers[0] :].count("rsqrt")
    assert (rsqrt_before, rsqrt_after) == (6, 2 * 2 + 1)  # + the head's norm


def test_pipeline_linen_mark_output_false_omits_final_marker():
    model = gpt.GPT(_config())
    tokens = _tokens(4)[:, :-1]
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    pipelined = jflax.pipeline(model, num_stages=4, mark_output=False)
    assert _marker_counts(jax.make_jaxpr(pipelined.apply)(variables, tokens).jaxpr) == {
        "forward": 3,
        "backward": 0,
    }


class _CompactStack(nn.Module):
    """A user model written with @nn.compact and a layer class of its own."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        for _ in range(4):
            x = _Residual()(x)
        return nn.Dense(3, name="head")(x)


class _Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + jnp.tanh(nn.Dense(8)(x))


def test_pipeline_linen_compact_user_model_same_values_and_grads():
    model = _CompactStack()
    x = jax.random.normal(jax.random.key(5), (3, 4))
    variables = model.init(jax.random.key(6), x)
    pipelined = jflax.pipeline(model, layout="E t|ttt L")

    def loss(apply, variables):
        return jnp.sum(apply(variables, x) ** 2)

    value_and_grad = jax.value_and_grad(loss, argnums=1)
    both = jax.jit(lambda v: (value_and_grad(model.apply, v), value_and_grad(pipelined.apply, v)))
    expected, actual = both(variables)
    _assert_trees_close(actual, expected)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=0)(pipelined.apply, variables)
    assert _marker_counts(jaxpr.jaxpr) == {"forward": 2, "backward": 2}


class _TiedToy(nn.Module):
    """Calls its embedding twice (`__call__` and `attend`) and its 2 layers once each."""

    def setup(self):
        self.embed = nn.Embed(8, 8)
        self.layers = [_Residual() for _ in range(2)]

    def __call__(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.embed.attend(h)


def test_pipeline_linen_other_methods_of_a_submodule_do_not_count_as_layer_calls():
    model = _TiedToy()
    tokens = jnp.zeros((2, 3), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    pipelined = jflax.pipeline(model, layout="t|t")
    jaxpr = jax.make_jaxpr(pipelined.apply)(variables, tokens).jaxpr
    assert _marker_counts(jaxpr)["forward"] == 2


def test_pipeline_linen_layer_count_mismatch_raises_with_fix():
    model = gpt.GPT(_config())
    tokens = _tokens(0)[:, :-1]
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match=r"has 3 layers .* runs 4 layers of class Block.*Fix"):
        jflax.pipeline(model, layout="E t|tt L").apply(variables, tokens)


def test_pipeline_linen_more_stages_than_layers_raises():
    model = gpt.GPT(_config(num_layers=2))
    tokens = _tokens(0)[:, :-1]
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages.*Fix"):
        jflax.pipeline(model, num_stages=3).apply(variables, tokens)


def test_pipeline_linen_both_or_neither_options_raise():
    model = gpt.GPT(_config())
    with pytest.raises(ValueError, match="exactly one of num_stages= and layout="):
        jflax.pipeline(model)
    with pytest.raises(ValueError, match="exactly one of num_stages= and layout="):
        jflax.pipeline(model, num_stages=2, layout="E tt|tt L")


class _RematClassStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.remat(_Residual)()(x)
        return x


def test_pipeline_linen_lifted_remat_layers_raise_with_fix():
    model = _RematClassStack()
    x = jnp.ones((2, 8))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match="lifted transforms.*Fix: apply the transform"):
        jflax.pipeline(model, num_stages=2).apply(variables, x)


class _NoRepeats(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(nn.Dense(4)(x))


def test_pipeline_linen_no_repeated_layer_raises_with_fix():
    model = _NoRepeats()
    x = jnp.ones((2, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot find its repeated layers.*Fix: pass layer="):
        jflax.pipeline(model, num_stages=2).apply(variables, x)


class _TwoRepeatedClasses(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = _Residual()(nn.Dense(8)(x))
        return nn.Dense(8)(_Residual()(x))


def test_pipeline_linen_layer_class_given_picks_those_calls():
    model = _TwoRepeatedClasses()
    x = jax.random.normal(jax.random.key(0), (2, 3))
    variables = model.init(jax.random.key(1), x)
    auto = jflax.pipeline(model, layout="t|t|t", mark_output=False)  # the 3 Dense calls
    assert _marker_counts(jax.make_jaxpr(auto.apply)(variables, x).jaxpr)["forward"] == 2
    chosen = jflax.pipeline(model, layout="t|t", layer=_Residual, mark_output=False)
    assert _marker_counts(jax.make_jaxpr(chosen.apply)(variables, x).jaxpr)["forward"] == 1
    np.testing.assert_array_equal(chosen.apply(variables, x), model.apply(variables, x))
    with pytest.raises(ValueError, match="has 3 layers .* runs 2 layers of class _Residual"):
        jflax.pipeline(model, layout="t|tt", layer=_Residual).apply(variables, x)


def test_pipeline_not_a_flax_module_raises():
    with pytest.raises(TypeError, match="takes a flax.linen or flax.nnx Module"):
        jflax.pipeline(lambda x: x, num_stages=2)


# --- NNX --------------------------------------------------------------------------------

NNX_CASES = {
    "unrolled-remat-tied": dict(remat=True, tie_embeddings=True),
    "scan": dict(scan_layers=True),
}


def _nnx_value_and_grad(model: nnx.Module):
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return gpt.cross_entropy(logits, tokens[:, 1:])

    return jax.value_and_grad(loss), state


@pytest.mark.parametrize("case", sorted(NNX_CASES))
def test_pipeline_nnx_layouts_same_loss_grads_and_markers(case):
    config = _config(**NNX_CASES[case])
    tokens = _tokens(8)
    abstract = nnx.eval_shape(lambda: gpt_nnx.GPT(config, rngs=nnx.Rngs(7)))
    for layout, num_stages in LAYOUTS:
        marked, state = _nnx_value_and_grad(jflax.pipeline(abstract, layout=layout))
        counts = _marker_counts(jax.make_jaxpr(marked)(state, tokens).jaxpr)
        assert counts == {"forward": num_stages, "backward": num_stages}, layout
    model = gpt_nnx.GPT(config, rngs=nnx.Rngs(7))
    functions = [_nnx_value_and_grad(model)]
    functions += [_nnx_value_and_grad(jflax.pipeline(model, layout=t)) for t in SPLIT_LAYOUTS]
    for _, state in functions[1:]:
        _assert_trees_close(state, functions[0][1], atol=0)  # same state tree and values

    def all_variants(states, tokens):
        return [f(state, tokens) for (f, _), state in zip(functions, states, strict=True)]

    states = [state for _, state in functions]
    (expected_loss, expected_grads), *results = jax.jit(all_variants)(states, tokens)
    for text, (loss, grads) in zip(SPLIT_LAYOUTS, results, strict=True):
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=text)
        _assert_trees_close(grads, expected_grads)
    assert type(model) is gpt_nnx.GPT  # the original is untouched


def test_pipeline_nnx_layer_count_mismatch_raises_with_fix():
    model = gpt_nnx.GPT(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"has 2 layers .* runs 4 layers.*Fix"):
        jflax.pipeline(model, layout="E t|t L")


class _TwoLists(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(2)])
        self.b = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in (*self.a, *self.b):
            x = layer(x)
        return x


def test_pipeline_nnx_ambiguous_layer_lists_raise_with_fix():
    with pytest.raises(ValueError, match=r"several lists .*\['a', 'b'\].*Fix: pass layer="):
        jflax.pipeline(_TwoLists(nnx.Rngs(0)), num_stages=2)


class _NoLayers(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def test_pipeline_nnx_no_layers_and_no_scan_raises_when_called():
    pipelined = jflax.pipeline(_NoLayers(nnx.Rngs(0)), num_stages=2)
    with pytest.raises(NotImplementedError, match="expected one top-level scan.*Fix"):
        pipelined(jnp.ones((1, 2)))
