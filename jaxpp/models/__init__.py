"""Example models jaxpp pipelines, and their data.

- `jaxpp.models.gpt`: a decoder-only GPT in Flax linen (`GPTConfig`, `GPT`), its
  next-token loss, parameter count and analytic training FLOPs.
- `jaxpp.models.gpt_nnx`: the same GPT written with Flax NNX.
- `jaxpp.models.synthetic`: a seeded sparse Markov language with a known entropy
  floor, and deterministic, resumable batches of it.
"""
