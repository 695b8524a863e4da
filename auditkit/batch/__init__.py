"""``auditkit batch``: many adapters scanned against one configuration, on one machine or a Ray cluster.

See :mod:`auditkit.batch.run` for the stages. Example:
    >>> from auditkit.batch import BatchConfig, run_batch                         # doctest: +SKIP
    >>> result = run_batch(BatchConfig(Path("adapters/"), Path("batch-out"),
    ...                                ScanConfig(safety=Path("safety.safetensors"), base="lab")))  # doctest: +SKIP
    >>> result.counts                                                             # doctest: +SKIP
    {'risk': 3, 'inconclusive': 0, 'pass': 16, 'error': 1}
"""

from auditkit.batch.run import BatchConfig, BatchResult, run_batch

__all__ = ["BatchConfig", "BatchResult", "run_batch"]
