"""A synthetic language a tiny model learns in ~100 steps, with a known entropy floor.

`MarkovLanguage` is a seeded sparse Markov chain: each token has `branching`
possible successors with random probabilities (one of them always `token + 1`,
so the chain is irreducible). Sequences start from the stationary distribution,
so every next-token prediction has the same conditional entropy, the entropy
rate: `entropy_floor`, the lowest mean cross-entropy any model can reach.

`SyntheticBatches` maps a step index to a batch with no hidden state: the
iterator's position is just an int, saved and restored by the caller.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class MarkovLanguage:
    """A seeded sparse first-order Markov chain over `vocab_size` tokens.

    Example:
        >>> language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
        >>> language.transition.shape, bool(np.allclose(language.transition.sum(1), 1))
        ((16, 16), True)
        >>> bool(0.0 < language.entropy_floor < np.log(2))
        True
    """

    vocab_size: int = 64
    branching: int = 4
    seed: int = 0
    transition: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    stationary: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"MarkovLanguage: vocab_size={self.vocab_size} must be >= 2.")
        if not 1 <= self.branching <= self.vocab_size:
            raise ValueError(
                f"MarkovLanguage: branching={self.branching} must be in [1, vocab_size="
                f"{self.vocab_size}]. Fix: pick fewer successors per token."
            )
        transition = _sparse_transition(self.vocab_size, self.branching, self.seed)
        object.__setattr__(self, "transition", transition)
        object.__setattr__(self, "stationary", _stationary(transition))

    @property
    def entropy_floor(self) -> float:
        """Entropy rate in nats/token: the best achievable mean next-token loss."""
        p = self.transition
        with np.errstate(divide="ignore", invalid="ignore"):
            per_state = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return float(self.stationary @ per_state)

    def sample(self, rng: np.random.Generator, *, batch_size: int, length: int) -> np.ndarray:
        """`batch_size` sequences of `length` tokens (int32), started from stationarity.

        Example:
            >>> language = MarkovLanguage(vocab_size=8, branching=1)
            >>> seq = language.sample(np.random.default_rng(0), batch_size=1, length=4)[0]
            >>> [int((b - a) % 8) for a, b in zip(seq, seq[1:])]  # branching 1: t -> t + 1
            [1, 1, 1]
        """
        cumulative = np.cumsum(self.transition, axis=1)
        tokens = np.empty((batch_size, length), np.int32)
        tokens[:, 0] = _draw(rng, np.cumsum(self.stationary)[None, :], batch_size)
        for t in range(1, length):
            tokens[:, t] = _draw(rng, cumulative[tokens[:, t - 1]], batch_size)
        return tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticBatches:
    """Deterministic batches: `batch_at(step)` depends only on `(seed, step)`.

    Each batch is `{"tokens": int32 [batch_size, seq_len + 1]}` (inputs and the
    shifted targets). To resume, keep the step index and call `iterate(start=step)`.

    Example:
        >>> batches = SyntheticBatches(language=MarkovLanguage(), batch_size=2, seq_len=8)
        >>> batches.batch_at(3)["tokens"].shape
        (2, 9)
        >>> step, batch = next(batches.iterate(start=3))
        >>> step, bool((batch["tokens"] == batches.batch_at(3)["tokens"]).all())
        (3, True)
    """

    language: MarkovLanguage
    batch_size: int
    seq_len: int
    seed: int = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step `step` (any int >= 0)."""
        if step < 0:
            raise ValueError(f"SyntheticBatches.batch_at: step={step} must be >= 0.")
        rng = np.random.default_rng((self.seed, step))
        tokens = self.language.sample(rng, batch_size=self.batch_size, length=self.seq_len + 1)
        return {"tokens": tokens}

    def iterate(self, *, start: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields `(step, batch)` for step = start, start + 1, ... forever."""
        step = start
        while True:
            yield step, self.batch_at(step)
            step += 1


def _sparse_transition(vocab_size: int, branching: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    transition = np.zeros((vocab_size, vocab_size))
    for token in range(vocab_size):
        following = (token + 1) % vocab_size
        others = rng.permutation(np.delete(np.arange(vocab_size), following))[: branching - 1]
        successors = np.concatenate([[following], others])
        transition[token, successors] = rng.dirichlet(np.ones(branching))
    return transition


def _stationary(transition: np.ndarray) -> np.ndarray:
    # Lazy chain (I + P) / 2 has the same stationary law and always converges.
    lazy = 0.5 * (np.eye(len(transition)) + transition)
    pi = np.full(len(transition), 1.0 / len(transition))
    for _ in range(10_000):
        new = pi @ lazy
        if np.abs(new - pi).max() < 1e-13:
            break
        pi = new
    return new / new.sum()


def _draw(rng: np.random.Generator, cumulative: np.ndarray, count: int) -> np.ndarray:
    u = rng.random(count)[:, None] * cumulative[:, -1:]
    return np.minimum((u >= cumulative).sum(axis=1), cumulative.shape[1] - 1)
