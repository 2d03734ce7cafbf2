"""`jaxpp train`: a tiny run through the command line learns, and prints its summary."""

import os

import jax
import numpy as np
import optax
import pytest

from jaxpp import _cli_train, _trainer, schedules
from jaxpp.cli import main
from jaxpp.flax import pipeline
from jaxpp.models import gpt

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab", "16", "--seq-len", "16"]


def _step_losses(out: str, steps: int) -> list[float]:
    lines = [line for line in out.splitlines() if line.startswith("step ") and f"/{steps} " in line]
    return [float(line.split("loss")[1].split()[0]) for line in lines]


def test_cli_train_jit_loss_falls_summary_prints_and_pipeline_matches(capsys):
    common = ["--stages", "2", "--microbatches", "2", *TINY, "--batch-size", "8", "--lr", "1e-2"]
    assert main(["train", "--executor", "jit", "--steps", "20", "--log-every", "1", *common]) == 0
    out = capsys.readouterr().out
    jit_losses = _step_losses(out, 20)
    assert len(jit_losses) == 20
    assert np.mean(jit_losses[-3:]) < jit_losses[0] - 0.5, out
    for row in ("final loss", "entropy floor", "median step", "tokens/s", "bubble"):
        assert row in out
    argv = ["train", "--executor", "pipeline", "--steps", "3", "--log-every", "1", *common]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "executor pipeline (2 cpu devices)" in out
    np.testing.assert_allclose(_step_losses(out, 3), jit_losses[:3], rtol=1e-5)


def test_cli_train_batch_not_divisible_by_microbatches_exits_with_message(capsys):
    assert main(["train", "--batch-size", "6", "--microbatches", "4", *TINY]) == 2
    assert "not divisible by 4 microbatches. Fix" in capsys.readouterr().out


def test_cli_train_unknown_schedule_exits_with_valid_names(capsys):
    assert main(["train", "--schedule", "no-such", "--executor", "jit", *TINY]) == 2
    assert "no-such" in capsys.readouterr().out


def test_make_train_step_accumulated_gradient_equals_full_batch_gradient():
    model = pipeline(gpt.GPT(gpt.GPTConfig(num_layers=2, d_model=16, num_heads=2)), num_stages=2)
    batch = {"tokens": jax.random.randint(jax.random.key(0), (4, 9), 0, 64)}
    optimizer = optax.sgd(1.0)
    state = _trainer.init_state(model, optimizer, jax.random.key(1), batch)
    step = _trainer.make_train_step(
        model, optimizer, schedule=schedules.GPipe(2), num_microbatches=2
    )
    loss_fn = gpt.make_loss_fn(model)

    @jax.jit
    def both(state, batch):
        new_state, metrics = step(state, batch)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        return new_state, metrics, loss, jax.tree.map(lambda p, g: p - g, state.params, grads)

    new_state, metrics, loss, expected = both(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    for a, e in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not split into 3 equal microbatches"):
        _trainer.make_train_step(model, optimizer, schedule=schedules.GPipe(2), num_microbatches=3)(
            state, batch
        )


def test_resolve_schedule_file_gives_schedule_and_mismatch_raises_with_fix(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text(schedules.format_schedule(schedules.Std1F1B(2).build(4)))
    resolved = _trainer.resolve_schedule(str(path), 2, 4)
    assert isinstance(resolved, schedules.Schedule) and resolved.num_ranks == 2
    with pytest.raises(ValueError, match="is for 2 stages and 4 microbatches.*Fix: pass"):
        _trainer.resolve_schedule(str(path), 4, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _trainer.resolve_schedule(str(tmp_path / "missing.txt"), 2, 4)


def test_configure_devices_without_gpu_adds_cpu_device_count_once(monkeypatch):
    monkeypatch.setattr(_cli_train, "_has_nvidia_gpu", lambda: False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    _cli_train.configure_devices()
    expected = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
    assert os.environ["XLA_FLAGS"] == expected
    _cli_train.configure_devices()
    assert os.environ["XLA_FLAGS"] == expected
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _cli_train.configure_devices()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


@pytest.mark.parametrize("field", ["num_stages", "num_microbatches", "batch_size", "log_every"])
def test_train_config_zero_counts_raise_with_flag(field):
    from jaxpp._trainer import TrainConfig

    with pytest.raises(ValueError, match=f"{field}=0 must be >= 1"):
        TrainConfig(**{field: 0})
