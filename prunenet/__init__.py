"""PruneNet: calibration-free structured pruning of transformer FFNs with a learned policy.

Entry points: ``prunenet.pipeline.compress`` (library), ``prunenet compress|eval`` (command line).
"""

__version__ = "0.1.0"
