"""The test setup forces 8 virtual CPU devices, except for a run of only the GPU tests."""

import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def test_only_a_run_of_gpu_tests_keeps_jax_platform_choice(load_file):
    only = load_file("tests/conftest.py")._only_gpu_tests
    gpu = HERE / "gpu" / "test_attention_gpu.py"
    assert only([str(gpu)])  # config.args: the positional paths and node ids alone
    assert only([f"{gpu}::test_mosaic_attention_tensor_parallel_shard_matches_reference"])
    assert only([str(HERE / "gpu")])
    assert not only([])  # plain `pytest`: the CPU suite
    assert not only([str(HERE)])
    assert not only([str(gpu), str(HERE / "test_layout.py")])
    assert not only([str(HERE / "gpu_like_name.py")])
