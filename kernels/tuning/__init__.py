"""kernels/tuning."""
