"""Hand-written compute kernels (installed as ``prunenet.kernels``)."""
