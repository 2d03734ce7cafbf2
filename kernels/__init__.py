"""Pallas GPU kernels: attention, sparse persistent RNN, and the tuning harness."""
