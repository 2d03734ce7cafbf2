"""Configuration names and the sweep of the throughput benchmark."""

import pytest

from jaxpp._bench import _configs


@pytest.mark.parametrize("preset", ["tiny", "2b", "8b"])
@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_sweep_names_round_trip_and_fit(preset, num_devices):
    configs = _configs.sweep(_configs.PRESETS[preset], num_devices)
    assert configs  # every machine size has something to run
    for config in configs:
        assert _configs.parse_config(config.name) == config
        assert config.num_devices == num_devices
        assert _configs.fit_problem(config, _configs.PRESETS[preset], num_devices) is None
    kinds = {c.kind for c in configs}
    assert kinds == {"spmd", "jaxpp"}


def test_sweep_covers_all_five_schedules_on_4_devices():
    configs = _configs.sweep(_configs.PRESETS["8b"], 4, only="jaxpp")
    assert {c.schedule for c in configs} == set(_configs.SCHEDULES)
    assert {c.layout for c in configs} == {"pp4", "pp2-dp2", "pp2-tp2"}
    zbv = [c for c in configs if c.schedule == "zbv"][0]
    assert zbv.num_stages == 2 * zbv.ranks


def test_presets_have_the_sizes_the_issue_asks_for():
    from jaxpp._bench import _run
    from jaxpp.models import gpt

    sizes = {
        k: gpt.param_count(_run.Problem(preset=p).model_config())
        for k, p in _configs.PRESETS.items()
    }
    assert 1.8e9 < sizes["2b"] < 2.5e9 and 7.5e9 < sizes["8b"] < 9e9
    assert all(2048 <= _configs.PRESETS[k].seq_len <= 4096 for k in ("2b", "8b"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("spmd/dp4/acc1", "malformed"),
        ("spmd/pp4/acc1/remat", "bad SPMD layout"),
        ("spmd/dp4/accx/remat", "bad SPMD layout or acc count"),
        ("jaxpp/1f1b/dp4/mb8/remat", "bad jaxpp layout"),
        ("jaxpp/zb/pp4/mb8/remat", "unknown schedule 'zb'"),
        ("jaxpp/1f1b/pp4/mb0/remat", "must be >= 1"),
        ("gspmd/dp4/acc1/remat", "malformed"),
        ("spmd/dp4/acc1/remat@fast", "unknown XLA flag preset 'fast'"),
    ],
)
def test_parse_config_bad_name_raises(name, message):
    with pytest.raises(ValueError, match=message):
        _configs.parse_config(name)


def test_sweep_bad_only_raises():
    with pytest.raises(ValueError, match="only='pp'"):
        _configs.sweep(_configs.PRESETS["tiny"], 4, only="pp")


def test_xla_preset_round_trips_and_names_its_flags():
    config = _configs.parse_config("jaxpp/zb-h1/pp4/mb32/noremat@overlap")
    assert config.name == "jaxpp/zb-h1/pp4/mb32/noremat@overlap"
    assert config.xla_flags == _configs.XLA_PRESETS["overlap"]
    assert _configs.parse_config("spmd/fsdp4/acc4/noremat").xla_flags == ()
