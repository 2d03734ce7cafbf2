"""Schedule DSL: IR, builders, text/CSV formats, validation, simulator, rendering. JAX-free."""
