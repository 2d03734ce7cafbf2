"""Sparse persistent RNNs: pruned recurrent weights held on chip across all timesteps.

After "Sparse Persistent RNNs" (Zhu et al., ICLR 2018). `SparseRecurrentWeights` packs a
pruned matrix once; `sparse_rnn` runs the recurrence (tanh, GRU, LSTM) forward and backward;
`SparseLSTM` and `SparseGRU` are Flax layers on top.
"""

from jaxpp.kernels.sparse_rnn._api import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxpp.kernels.sparse_rnn._api import SparseRNNTimeoutError as SparseRNNTimeoutError
from jaxpp.kernels.sparse_rnn._api import sparse_rnn as sparse_rnn
from jaxpp.kernels.sparse_rnn._layers import SparseGRU as SparseGRU
from jaxpp.kernels.sparse_rnn._layers import SparseLSTM as SparseLSTM
from jaxpp.kernels.sparse_rnn._reference import sparse_rnn_reference as sparse_rnn_reference
from jaxpp.kernels.sparse_rnn._weights import MAX_SLOTS_PER_BLOCK as MAX_SLOTS_PER_BLOCK
from jaxpp.kernels.sparse_rnn._weights import SparseRecurrentWeights as SparseRecurrentWeights
from jaxpp.kernels.sparse_rnn._weights import default_num_blocks as default_num_blocks

__all__ = [
    "IMPLEMENTATIONS",
    "MAX_SLOTS_PER_BLOCK",
    "SparseGRU",
    "SparseLSTM",
    "SparseRNNTimeoutError",
    "SparseRecurrentWeights",
    "default_num_blocks",
    "sparse_rnn",
    "sparse_rnn_reference",
]
