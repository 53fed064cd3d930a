"""Hand-written Triton kernels (installed as ``prunenet.kernels``).

One module per op, each importing ``triton`` (import them only where it is installed):

* :mod:`prunenet.kernels.gram`: Gram matrices of gathered rows for a batch of layers.
* :mod:`prunenet.kernels.ks`: exact two-sample Kolmogorov-Smirnov statistics for a batch of layers.

When each is used (and the complement route's cost model) is decided in :mod:`prunenet.ops`.
"""
