"""Flax pipeline wrappers; the public names are re-exported by `jaxpp.flax`."""
