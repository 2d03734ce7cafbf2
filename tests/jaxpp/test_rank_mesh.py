"""Sharding annotations inside pipeline stages: written once against a template mesh
(`mpmd_mesh.rank_mesh(0)`), they run on every rank's own devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from pipeline_models import assert_trees_close

import jaxpp
import jaxpp.flax as jflax
from jaxpp import _compiler
from jaxpp._bench import _spmd
from jaxpp.models import gpt
from jaxpp.runtime import _local, _rank_mesh

VOCAB = 16
NUM_MICROBATCHES = 2
MICROBATCH = 4  # sequences per microbatch
SEQ_LEN = 8


def _mpmd_mesh(data: int, model: int) -> jaxpp.MpmdMesh:
    devices = np.array(jax.devices()[: 2 * data * model]).reshape(2, data, model)
    return jaxpp.MpmdMesh(Mesh(devices, ("stages", "data", "model")), "stages")


def _config(sharding: gpt.ActivationSharding | None, **overrides) -> gpt.GPTConfig:
    base = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2)
    return gpt.GPTConfig(**(base | overrides), attention="xla", activation_sharding=sharding)


def _optimizer() -> optax.GradientTransformation:
    # Linear in the gradients, so the new state checks them to float32 tolerance (Adam's
    # first step moves a weight by ~lr * sign(g), erratic where |g| is near its eps).
    return optax.sgd(0.1, momentum=0.9)


def _train_step(state, batch, *, loss_fn, schedule):
    params, opt_state = state
    losses, grads = jaxpp.treduce(
        lambda mb: jax.value_and_grad(loss_fn)(params, mb), batch, schedule=schedule
    )
    grads = jax.tree.map(lambda g: g / NUM_MICROBATCHES, grads)
    updates, opt_state = _optimizer().update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), losses


def _batch(seed: int) -> dict:
    shape = (NUM_MICROBATCHES, MICROBATCH, SEQ_LEN + 1)
    return {"tokens": jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)}


def _pipelined_gpt(mpmd_mesh, schedule, *, fsdp=False, **overrides):
    """The pipelined step with template annotations, and jax.jit of it without any."""
    template = mpmd_mesh.rank_mesh(0)
    sharding = gpt.ActivationSharding(template, ("data",), "model")
    plain = gpt.GPT(_config(None, **overrides))
    annotated = gpt.GPT(_config(sharding, **overrides))
    params = plain.init(jax.random.key(0), _batch(0)["tokens"][0, :, :-1])["params"]
    state = (params, _optimizer().init(params))
    # Weights as the SPMD benchmark shards them: Megatron over "model"; over "data"
    # replicated, or split too under `fsdp`.
    shape = mpmd_mesh.jax_mesh.shape
    layout = _spmd.Layout(data=shape["data"], model=shape["model"], fsdp=fsdp)
    state_specs = _spmd.state_specs(state, layout)
    pipelined = jaxpp.mpmd_jit_with_loop(
        functools.partial(
            _train_step,
            loss_fn=gpt.make_loss_fn(jflax.pipeline(annotated, num_stages=2)),
            schedule=schedule,
        ),
        mpmd_mesh=mpmd_mesh,
        in_shardings=(state_specs, {"tokens": P(None, "data")}),
    )
    reference = jax.jit(
        functools.partial(_train_step, loss_fn=gpt.make_loss_fn(plain), schedule=schedule)
    )
    return pipelined, reference, state


@pytest.mark.parametrize(
    ("data", "model", "fsdp", "schedule", "overrides", "steps"),
    [
        pytest.param(2, 1, True, jaxpp.Std1F1B(2), {}, 2, id="pp2-fsdp2-1f1b"),
        pytest.param(1, 2, False, jaxpp.ZeroBubble(2), {"remat": True}, 1, id="pp2-tp2-zb-remat"),
        pytest.param(
            2, 2, True, jaxpp.Std1F1B(2), {"scan_layers": True}, 1, id="pp2-fsdp2-tp2-scan"
        ),
    ],
)
def test_gpt_annotated_on_template_mesh_matches_plain_jit(
    data, model, fsdp, schedule, overrides, steps, monkeypatch
):
    """The pipelined GPT with in-stage annotations trains like jax.jit without them;
    inside a stage every device keeps its batch (and head) shard: attention sees per-
    device shapes, and no stage program all-gathers a whole microbatch of activations
    (without the annotations, FSDP inside a stage did: [4, 8, 16] in s1/B)."""
    attention_shapes = _record_attention_shapes(monkeypatch)
    programs = _record_programs(monkeypatch)
    mpmd_mesh = _mpmd_mesh(data, model)
    pipelined, reference, state = _pipelined_gpt(mpmd_mesh, schedule, fsdp=fsdp, **overrides)
    batches = [_batch(10 + i) for i in range(steps)]  # a second step reads the first's placement
    ref, want = state, []
    for batch in batches:
        ref, ref_losses = reference(ref, batch)
        want.append((ref, ref_losses))
    attention_shapes.clear()  # the reference's
    out = state
    for i, (batch, (ref, ref_losses)) in enumerate(zip(batches, want, strict=True)):
        out, losses = pipelined(out, batch)
        assert_trees_close(losses, ref_losses, rtol=1e-4, atol=1e-5, what=f"losses {i}")
        assert_trees_close(out, ref, rtol=1e-4, atol=1e-5, what=f"state {i}")
    # Each rank's results live on its own devices (rank 1 holds the head).
    head = out[0]["head"]["unembed"]["kernel"]
    assert head.sharding.device_set == set(mpmd_mesh.rank_mesh(1).devices.flat)
    per_device = (MICROBATCH // data, SEQ_LEN, 4 // model, 8)  # [batch, seq, heads, head_dim]
    assert attention_shapes and set(attention_shapes) == {per_device}, attention_shapes
    stage_programs = {key: text for key, text in programs.items() if key[0].startswith("s")}
    assert {rank for _, rank, _ in stage_programs} == {0, 1}
    for (name, rank, _), text in stage_programs.items():
        gathered = re.findall(r"\[([0-9,]+)\]\{[0-9,]*\} all-gather\(", text)
        # [batch, seq, ...] of a whole microbatch ([batch, seq, 1] loss terms are tiny).
        whole = [
            s for s in gathered if s.startswith(f"{MICROBATCH},{SEQ_LEN},") and not s.endswith(",1")
        ]
        assert not whole, f"{name} on rank {rank} gathers whole activations: {whole}"


def test_gpt_annotated_one_device_ranks_compile_ahead_and_match_plain_jit():
    """Ranks of one device (the common case): annotations on the template move too, and
    every task program is still compiled ahead, for the devices it then runs on."""
    mpmd_mesh = _mpmd_mesh(1, 1)
    pipelined, reference, state = _pipelined_gpt(mpmd_mesh, jaxpp.Std1F1B(2))
    batch = _batch(7)
    ref, ref_losses = reference(state, batch)
    out, losses = pipelined(state, batch)
    assert_trees_close(losses, ref_losses, rtol=1e-4, atol=1e-5, what="losses")
    assert_trees_close(out, ref, rtol=1e-4, atol=1e-5, what="state")
    executor = pipelined.last_compiled.executor
    assert executor.last_precompile.programs > 0
    assert executor.last_precompile.failed == 0
    assert executor.precompile_misses == 0


def _record_attention_shapes(monkeypatch) -> list:
    """The q shapes the attention kernel is called with (while a function is traced)."""
    import jaxpp.kernels.attention as attention

    shapes = []

    def recording(q, k, v, **kwargs):
        shapes.append(q.shape)
        return jax.nn.dot_product_attention(q, k, v, is_causal=kwargs["causal"])

    monkeypatch.setattr(attention, "dot_product_attention", recording)
    return shapes


def _record_programs(monkeypatch) -> dict:
    """(task name, rank, argument types) -> the optimized HLO text of that program."""
    programs = {}
    make_jit = _local.LocalExecutor._make_jit

    def recording_jit(self, task, rank):
        jitted = make_jit(self, task, rank)
        compiled = {}

        def call(*args):
            types = tuple((jax.typeof(a), getattr(a, "sharding", None)) for a in args)
            if types not in compiled:
                compiled[types] = jitted.lower(*args).compile()
                programs[task.name, rank, types] = compiled[types].as_text()
            return compiled[types](*args)

        return call

    monkeypatch.setattr(_local.LocalExecutor, "_make_jit", recording_jit)
    return programs


# -- the rewrite itself -------------------------------------------------------------------


def _rank_meshes():
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    return Mesh(devices[0], ("data",)), Mesh(devices[1], ("data",))


def _nested(template: Mesh):
    """`x -> (value_and_grad of a sum, a forward-only part)` with template meshes in nested
    jaxprs: jit, remat, scan, cond, while, custom_vjp, custom_jvp, shard_map."""
    spec = NamedSharding(template, P("data"))

    def pin(x):
        return jax.lax.with_sharding_constraint(x, spec)

    @jax.custom_vjp
    def twice(x):
        return pin(2 * x)

    twice.defvjp(lambda x: (twice(x), None), lambda _, g: (2 * g,))

    @jax.custom_jvp
    def thrice(x):
        return pin(3 * x)

    thrice.defjvp(lambda primals, tangents: (thrice(primals[0]), 3 * tangents[0]))

    @jax.jit
    def inner(x):
        return pin(jnp.sin(x))

    def body(carry, x):
        y = jax.checkpoint(lambda a: pin(a * carry))(x)
        return carry + 1.0, y

    def per_shard(x):
        return x * (1.0 + jax.lax.axis_index("data").astype(x.dtype))

    def loss(x):
        x = inner(x)
        _, x = jax.lax.scan(body, 1.0, x[None])
        x = jax.lax.cond(x[0, 0] > 0, twice, lambda a: a - 1.0, x[0])
        x = jax.shard_map(per_shard, mesh=template, in_specs=P("data"), out_specs=P("data"))(x)
        return jnp.sum(x**2)

    def forward_only(x):
        x = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, pin(c[1] * 1.5)), (0, x))
        return thrice(twice(x[1]))

    return lambda x: (jax.value_and_grad(loss)(x), forward_only(x))


def test_nested_template_meshes_run_on_the_rank_devices():
    template, rank_1 = _rank_meshes()
    f = _nested(template)
    x = jax.random.normal(jax.random.key(1), (8,))
    closed = jax.make_jaxpr(f)(x)
    fn = _compiler._make_fn(closed.jaxpr.invars, closed.jaxpr.eqns, closed.jaxpr.outvars)
    on_rank_1 = jax.device_put(x, NamedSharding(rank_1, P()))
    got = jax.jit(_rank_mesh.on_rank(fn, 1, rank_1))(on_rank_1)
    want = jax.jit(f)(x)  # on the template's own devices
    assert_trees_close(jax.tree.leaves(got), jax.tree.leaves(want), what="nested")
    for leaf in got:
        assert leaf.sharding.device_set == set(rank_1.devices.flat)
    with pytest.raises(ValueError, match="devices"):
        jax.jit(fn)(on_rank_1)  # unmoved, the template's devices clash with the rank's


def test_unannotated_task_params_stay_the_same_object():
    _, rank_1 = _rank_meshes()
    closed = jax.make_jaxpr(lambda x: jnp.sin(jax.jit(jnp.cos)(x)))(1.0)
    seen = []

    def check(*args):
        for eqn in closed.jaxpr.eqns:
            seen.append(_rank_mesh.rank_params(eqn) is eqn.params)
        return args

    _rank_mesh.on_rank(check, 1, rank_1)(1.0)
    assert seen == [True, True]


def test_mesh_with_other_axes_raises_with_fix():
    _, rank_1 = _rank_meshes()
    whole = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("stages", "data"))
    closed = jax.make_jaxpr(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(whole, P("data")))
    )(jnp.ones(4))
    fn = _compiler._make_fn(closed.jaxpr.invars, closed.jaxpr.eqns, closed.jaxpr.outvars)
    with pytest.raises(_rank_mesh.MeshMismatchError, match=r"rank 1 .*Fix: .*rank_mesh\(0\)"):
        jax.jit(_rank_mesh.on_rank(fn, 1, rank_1))(jnp.ones(4))
