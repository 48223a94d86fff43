"""The plumbing every step shares: run records (``runs``), claims on run keys, fields and folders
(``claims``, ``folders``), validation and limits, bulk write-back, field helpers, config and cache
folders, model loading (``models``), image loading (``images``), multi-process helpers
(``distributed``), the balance-summary cache and sharded delegated runs (``sharding``).

The lowest layer: nothing here imports ``find``, ``tag``, ``generate``, ``train``, ``datasets`` or ``ops``.
"""
