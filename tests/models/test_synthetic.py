"""The synthetic Markov language: determinism, resumable batches, and its entropy floor."""

import numpy as np
import pytest

from jaxpp.models.synthetic import MarkovLanguage, SyntheticBatches


def test_markov_language_rows_have_branching_successors_and_stationary_is_fixed_point():
    language = MarkovLanguage(vocab_size=32, branching=3, seed=4)
    p = language.transition
    assert ((p > 0).sum(axis=1) == 3).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(language.stationary @ p, language.stationary, atol=1e-10)


def test_entropy_floor_equals_empirical_loss_of_the_true_chain():
    language = MarkovLanguage(vocab_size=32, branching=4, seed=1)
    batches = SyntheticBatches(language=language, batch_size=64, seq_len=64, seed=2)
    tokens = np.concatenate([batches.batch_at(step)["tokens"] for step in range(8)])
    nll = -np.log(language.transition[tokens[:, :-1], tokens[:, 1:]]).mean()
    assert abs(nll - language.entropy_floor) < 0.03
    assert 0.2 < language.entropy_floor < np.log(4)


def test_batch_at_depends_only_on_seed_and_step():
    language = MarkovLanguage(vocab_size=16)
    a = SyntheticBatches(language=language, batch_size=4, seq_len=8, seed=0)
    b = SyntheticBatches(language=MarkovLanguage(vocab_size=16), batch_size=4, seq_len=8, seed=0)
    np.testing.assert_array_equal(a.batch_at(5)["tokens"], b.batch_at(5)["tokens"])
    assert not np.array_equal(a.batch_at(5)["tokens"], a.batch_at(6)["tokens"])
    other_seed = SyntheticBatches(language=language, batch_size=4, seq_len=8, seed=1)
    assert not np.array_equal(a.batch_at(5)["tokens"], other_seed.batch_at(5)["tokens"])
    tokens = a.batch_at(0)["tokens"]
    assert tokens.dtype == np.int32 and tokens.shape == (4, 9)
    assert tokens.min() >= 0 and tokens.max() < 16


def test_iterate_resumed_at_a_step_continues_the_same_stream():
    batches = SyntheticBatches(language=MarkovLanguage(), batch_size=2, seq_len=4, seed=3)
    stream = batches.iterate()
    first = [next(stream) for _ in range(5)]
    resumed = batches.iterate(start=3)
    for step, batch in first[3:]:
        again_step, again = next(resumed)
        assert again_step == step
        np.testing.assert_array_equal(again["tokens"], batch["tokens"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(vocab_size=1), "vocab_size=1 must be >= 2"),
        (dict(vocab_size=8, branching=9), r"branching=9 must be in \[1, vocab_size=8\]"),
        (dict(branching=0), r"branching=0 must be in"),
    ],
)
def test_markov_language_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MarkovLanguage(**kwargs)


def test_batch_at_negative_step_raises():
    batches = SyntheticBatches(language=MarkovLanguage(), batch_size=1, seq_len=2)
    with pytest.raises(ValueError, match="step=-1 must be >= 0"):
        batches.batch_at(-1)
