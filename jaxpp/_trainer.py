"""The GPT trainer behind `jaxpp train`: the train step written the JaxPP way, and its loop.

`make_train_step` is the reusable part (tests and benchmarks build steps with it):
`treduce` over microbatches of `jax.value_and_grad` of the stage-marked loss, then
the optax update. `train` builds the model, data and optimizer from a
`TrainConfig`, runs the step with `jax.jit` or `mpmd_jit_with_loop`, prints a
progress line every few steps and a summary table, and returns the numbers.
"""

import dataclasses
import io
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpp import checkpoint, schedules
from jaxpp._flax import _linen
from jaxpp._treduce import Add, Concat, split_microbatches, treduce
from jaxpp.models import gpt, synthetic
from jaxpp.runtime import _distributed

EXECUTORS = ("pipeline", "jit")
LR_SCHEDULES = ("cosine", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
    """Parameters and optimizer state, with the number of steps taken."""

    step: jax.Array
    params: Any
    opt_state: Any


Batch = Mapping[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    model: gpt.ApplyModel,
    optimizer: optax.GradientTransformation,
    *,
    schedule: schedules.ScheduleBuilder | schedules.Schedule,
    num_microbatches: int,
) -> TrainStep:
    """The train step: `treduce` of value-and-grad over microbatches, then the update.

    Args:
        model: a stage-marked model with linen's `apply` (e.g. `jaxpp.flax.pipeline(GPT(c),
            num_stages=S)`); its loss is `gpt.make_loss_fn(model)`.
        optimizer: an optax transformation.
        schedule: the pipeline schedule `treduce` runs (ignored under plain `jax.jit`).
        num_microbatches: the batch's leading axis is split into this many microbatches.

    Returns:
        `step(state, batch) -> (state, metrics)`, for `jax.jit` or `mpmd_jit_with_loop`;
        `batch["tokens"]` is [batch, seq_len + 1], metrics hold the mean "loss" and the
        "grad_norm" of the mean gradient.

    Example:
        >>> from jaxpp.models import gpt
        >>> cfg = gpt.GPTConfig(num_layers=2, d_model=16, num_heads=2, vocab_size=8)
        >>> model = _linen.pipeline_linen(gpt.GPT(cfg), num_stages=2)
        >>> optimizer = optax.adamw(1e-2)
        >>> batch = {"tokens": jnp.ones((4, 5), jnp.int32)}
        >>> init = lambda key: init_state(model, optimizer, key, batch)
        >>> state = jax.eval_shape(init, jax.random.key(0))
        >>> step = make_train_step(model, optimizer, schedule=schedules.GPipe(2),
        ...                        num_microbatches=2)
        >>> state, metrics = jax.eval_shape(step, state, batch)  # or jax.jit(step)(...)
        >>> state.step.shape, metrics["loss"].shape
        ((), ())
    """
    loss_fn = gpt.make_loss_fn(model)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        microbatches = split_microbatches(batch, num_microbatches)

        def microbatch_step(microbatch: Batch):
            return jax.value_and_grad(loss_fn)(state.params, microbatch)

        losses, grads = treduce(
            microbatch_step, microbatches, schedule=schedule, operation=(Concat(), Add())
        )
        grads = jax.tree.map(lambda g: g / num_microbatches, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.mean(losses), "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def init_state(
    model: gpt.ApplyModel, optimizer: optax.GradientTransformation, key: jax.Array, batch: Batch
) -> TrainState:
    """Initial parameters (from `key`) and optimizer state for `batch`'s shapes.

    Example:
        >>> from jaxpp.models import gpt
        >>> model = gpt.GPT(gpt.GPTConfig(num_layers=1, d_model=16, num_heads=2))
        >>> batch = {"tokens": jnp.ones((2, 5), jnp.int32)}
        >>> init = lambda key: init_state(model, optax.sgd(0.1), key, batch)
        >>> state = jax.eval_shape(init, jax.random.key(0))  # or init(jax.random.key(0))
        >>> state.params["embed"]["positions"].shape
        (128, 16)
    """
    params = model.init(key, jnp.asarray(batch["tokens"])[:, :-1])["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_optimizer(
    *,
    learning_rate: float,
    steps: int,
    warmup_steps: int = 0,
    lr_schedule: str = "cosine",
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with a warmup-cosine or constant learning rate, optionally clipped.

    Example:
        >>> opt = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=2, clip_norm=1.0)
        >>> state = opt.init({"w": jnp.ones(2)})
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r}; expected one of {LR_SCHEDULES}.")
    if lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=max(warmup_steps, 0),
            decay_steps=max(steps, warmup_steps + 1),
            end_value=learning_rate * 0.1,
        )
    else:
        lr = optax.constant_schedule(learning_rate)
    adamw = optax.adamw(lr, b2=0.98, weight_decay=weight_decay)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Everything `jaxpp train` can set; the defaults run in ~1 minute on a 2-core CPU."""

    num_stages: int = 4
    num_microbatches: int = 8
    schedule: str = "1f1b"
    steps: int = 100
    dtype: str = "float32"
    batch_size: int = 32
    seq_len: int = 32
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    vocab_size: int = 64
    num_kv_heads: int | None = None
    scan_layers: bool = False
    remat: bool = False
    tie_embeddings: bool = False
    attention: str = "auto"
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    executor: str = "pipeline"
    seed: int = 0
    log_every: int = 10
    checkpoint_dir: str | None = None
    save_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"save_every={self.save_every} must be >= 0 (0: at the end only).")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint directory. Fix: --checkpoint-dir DIR.")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r}; expected one of {EXECUTORS}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {tuple(DTYPES)}.")
        for name in ("num_stages", "num_microbatches", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.removeprefix("num_").replace("_", "-")
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (flag {flag}).")
        if self.batch_size % self.num_microbatches:
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by {self.num_microbatches} "
                f"microbatches. Fix: e.g. --batch-size "
                f"{self.num_microbatches * max(1, self.batch_size // self.num_microbatches)}."
            )
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1.")

    def checkpoint_config(self) -> dict[str, int | str | bool | None]:
        """What a checkpoint must match to resume: the model's shapes, not its layout."""
        names = (
            "num_layers",
            "d_model",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
            "seq_len",
            "dtype",
            "scan_layers",
            "tie_embeddings",
        )
        return {name: getattr(self, name) for name in names}

    def model_config(self) -> gpt.GPTConfig:
        """The GPT this run trains."""
        return gpt.GPTConfig(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            max_seq_len=self.seq_len,
            dtype=DTYPES[self.dtype],
            num_kv_heads=self.num_kv_heads,
            scan_layers=self.scan_layers,
            remat=self.remat,
            tie_embeddings=self.tie_embeddings,
            attention=self.attention,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TrainResult:
    """What a run measured: per-step losses and seconds, and the data's entropy floor."""

    losses: tuple[float, ...]
    step_seconds: tuple[float, ...]
    entropy_floor: float
    tokens_per_step: int
    bubble: float | None

    @property
    def median_step_seconds(self) -> float:
        """Median step time, leaving out the first step (compilation)."""
        timed = self.step_seconds[1:] or self.step_seconds
        return statistics.median(timed)

    @property
    def tokens_per_second(self) -> float:
        """Tokens per second at the median step time."""
        return self.tokens_per_step / self.median_step_seconds

    @property
    def final_loss(self) -> float:
        """Mean loss of the last (up to) 5 steps."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail)


def resolve_schedule(
    name_or_file: str, num_stages: int, num_microbatches: int
) -> schedules.ScheduleBuilder | schedules.Schedule:
    """A built-in schedule by name, or a schedule text file (`.txt`) or CSV (`.csv`).

    Example:
        >>> resolve_schedule("gpipe", 2, 4).num_stages
        2
    """
    path = pathlib.Path(name_or_file)
    if path.suffix in (".txt", ".csv") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"schedule file {path} does not exist.")
        text = path.read_text()
        parsed = schedules.from_csv(text) if path.suffix == ".csv" else schedules.parse(text)
        if parsed.num_stages != num_stages or parsed.num_microbatches != num_microbatches:
            raise ValueError(
                f"schedule file {path} is for {parsed.num_stages} stages and "
                f"{parsed.num_microbatches} microbatches, but the run uses {num_stages} and "
                f"{num_microbatches}. Fix: pass --stages {parsed.num_stages} --microbatches "
                f"{parsed.num_microbatches}."
            )
        return parsed
    return schedules.get_builder(name_or_file, num_stages)


def _num_ranks(schedule: schedules.ScheduleBuilder | schedules.Schedule) -> int:
    return schedule.num_ranks


def train(config: TrainConfig, *, out: TextIO | None = None) -> TrainResult:
    """Trains the GPT of `config` on the synthetic language; prints progress and a summary.

    Example:
        >>> import io
        >>> cfg = TrainConfig(steps=2, executor="jit", num_stages=2, num_layers=2, d_model=16,
        ...                   num_microbatches=2, batch_size=4, seq_len=8, log_every=1)
        >>> len(train(cfg, out=io.StringIO()).losses)  # doctest: +SKIP
        2
    """
    out = sys.stdout if out is None else out
    if jax.process_index() != 0:  # several processes (jaxpp train -n N): process 0 reports
        out = io.StringIO()
    model_config = config.model_config()
    schedule = resolve_schedule(config.schedule, config.num_stages, config.num_microbatches)
    model = _linen.pipeline_linen(gpt.GPT(model_config), num_stages=config.num_stages)
    optimizer = make_optimizer(
        learning_rate=config.learning_rate,
        steps=config.steps,
        warmup_steps=config.warmup_steps,
        lr_schedule=config.lr_schedule,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )
    language = synthetic.MarkovLanguage(vocab_size=config.vocab_size, seed=config.seed)
    data = synthetic.SyntheticBatches(
        language=language, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    step_fn = make_train_step(
        model, optimizer, schedule=schedule, num_microbatches=config.num_microbatches
    )
    num_ranks = _num_ranks(schedule)
    if config.executor == "jit":
        run_step = jax.jit(step_fn)
        where = f"jax.jit on {jax.devices()[0].platform}"
    else:
        run_step = _pipelined(step_fn, num_ranks)
        where = f"{num_ranks} {jax.devices()[0].platform} devices"
    state = init_state(model, optimizer, jax.random.key(config.seed), data.batch_at(0))
    state, first_index, manager = _place_or_resume(config, run_step, state, data.batch_at(0))
    tokens_per_step = config.batch_size * config.seq_len
    header = (
        f"jaxpp train: GPT {config.num_layers} layers, d_model {config.d_model}, "
        f"{gpt.param_count(model_config) / 1e6:.3f}M params, {config.dtype}; "
        f"{config.num_stages} stages x {config.num_microbatches} microbatches, "
        f"schedule {_schedule_name(schedule)}, executor {config.executor} ({where}); "
        f"entropy floor {language.entropy_floor:.3f} nats"
    )
    print(header, file=out, flush=True)
    if first_index:
        print(f"resumed from step {first_index} ({config.checkpoint_dir})", file=out, flush=True)
    losses, seconds, profile = [], [], None
    for index, batch in data.iterate(start=first_index):
        if index >= config.steps:
            break
        start = time.perf_counter()
        state, metrics = run_step(state, batch)
        metrics = _distributed.fetch(metrics)  # waits for the step; to every process
        loss = float(metrics["loss"])
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        if manager is not None:
            manager.save(index + 1, state, data_position=index + 1)  # async, every --save-every
        # The second step of this run (compiled and warm): profile once for the bubble.
        if index == first_index + 1 and config.executor == "pipeline":
            profile = _profile(run_step, state, batch)
        first = index == first_index
        if (index + 1) % config.log_every == 0 or first or index + 1 == config.steps:
            bubble = _bubble(profile, seconds[-1])
            print(
                f"step {index + 1:5d}/{config.steps}  loss {loss:7.4f} "
                f"(floor {language.entropy_floor:.3f})  gnorm {float(metrics['grad_norm']):6.3f}"
                f"  {seconds[-1]:7.3f} s  {tokens_per_step / seconds[-1]:10,.0f} tok/s"
                f"  bubble {_format_bubble(bubble)}",
                file=out,
                flush=True,
            )
    if manager is not None:
        if manager.latest_step() != config.steps:
            manager.save(config.steps, state, data_position=config.steps, force=True)
        manager.close()  # waits for the last write
    result = TrainResult(
        tuple(losses),
        tuple(seconds),
        language.entropy_floor,
        tokens_per_step,
        None,
    )
    bubble = _bubble(profile, result.median_step_seconds)
    result = dataclasses.replace(result, bubble=bubble)
    flops = gpt.train_flops_per_token(model_config, config.seq_len) * result.tokens_per_second
    print(_summary(result, flops), file=out, flush=True)
    return result


def _place_or_resume(
    config: TrainConfig, run_step: Callable, state: TrainState, batch: Batch
) -> tuple[TrainState, int, checkpoint.CheckpointManager | None]:
    """The state to start from (fresh, or the newest checkpoint with --resume), placed where
    the step wants it; the index of the first batch; the checkpoint manager, if any."""
    if jax.process_count() > 1 and config.checkpoint_dir is None:
        return state, 0, None
    # Placing the fresh state where this layout wants it makes the first step compile
    # once, not again as the state moves to its stages; a checkpoint restores there too.
    target = checkpoint.restore_target(run_step, state, batch)
    state = jax.device_put(state, jax.tree.map(lambda t: t.sharding, target))
    if config.checkpoint_dir is None:
        return state, 0, None
    manager = checkpoint.CheckpointManager(
        config.checkpoint_dir,
        save_every=config.save_every or config.steps,
        max_to_keep=3,
        config=config.checkpoint_config(),
    )
    if not config.resume or manager.latest_step() is None:
        return state, 0, manager
    restored = manager.restore(target)
    first_index = int(restored.data_position)
    if first_index >= config.steps:
        manager.close()
        raise ValueError(
            f"the checkpoint in {config.checkpoint_dir} is at step {first_index}, and "
            f"--steps is {config.steps}: nothing to train. Fix: raise --steps."
        )
    return restored.state, first_index, manager


def _pipelined(step_fn: TrainStep, num_ranks: int) -> Callable:
    from jaxpp._mpmd import MpmdMesh, mpmd_jit_with_loop

    devices = jax.devices()
    if len(devices) < num_ranks:
        raise ValueError(
            f"the schedule needs {num_ranks} ranks but only {len(devices)} devices are visible. "
            f"Fix: fewer --stages, or on a CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_ranks}."
        )
    grid = np.array(devices[:num_ranks]).reshape(num_ranks, 1, 1)
    mesh = MpmdMesh(jax.sharding.Mesh(grid, ("stages", "data", "model")), "stages")
    return mpmd_jit_with_loop(step_fn, mpmd_mesh=mesh)


def _profile(run_step: Callable, state: TrainState, batch: Batch):
    """The executor's profile of one step (None for `jax.jit`): it runs the step twice more
    with per-task timing and discards the results."""
    profile = getattr(run_step, "profile", None)
    return None if profile is None else profile(state, batch)


def _bubble(profile, step_seconds: float) -> float | None:
    return None if profile is None else profile.bubble(step_seconds)


def _format_bubble(bubble: float | None) -> str:
    return "n/a" if bubble is None else f"{100 * bubble:.0f}%"


def _schedule_name(schedule: schedules.ScheduleBuilder | schedules.Schedule) -> str:
    if isinstance(schedule, schedules.Schedule):
        return f"file ({schedule.num_ranks} ranks)"
    return type(schedule).__name__


def _summary(result: TrainResult, flops_per_second: float) -> str:
    rows = (
        ("steps", f"{len(result.losses)}"),
        ("first loss", f"{result.losses[0]:.4f}"),
        ("final loss", f"{result.final_loss:.4f} (mean of last {min(5, len(result.losses))})"),
        ("entropy floor", f"{result.entropy_floor:.4f}"),
        ("gap to floor", f"{result.final_loss - result.entropy_floor:.4f}"),
        ("median step", f"{1e3 * result.median_step_seconds:.1f} ms"),
        ("tokens/s", f"{result.tokens_per_second:,.0f}"),
        ("model FLOP/s", f"{flops_per_second / 1e9:.3f} GFLOP/s (6N + attention)"),
        ("bubble", _format_bubble(result.bubble)),
    )
    width = max(len(name) for name, _ in rows)
    lines = ["summary", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
