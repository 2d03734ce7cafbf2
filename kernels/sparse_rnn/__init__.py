"""kernels/sparse_rnn."""
