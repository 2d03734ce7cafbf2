"""Checkpoints of pipelined train states on orbax; the public names live in `jaxpp.checkpoint`."""
