"""The plumbing every step shares: the capability table (``capabilities``: every capability, its step,
command, operator and shard spec), run records (``runs``), claims on run keys, fields and folders
(``claims``, ``folders``), validation and limits, bulk write-back, field helpers, config and cache
folders, model loading (``models``), the data helpers of every model (``data``: labelled samples,
image loading, seeding), image streaming (``images``), multi-process helpers (``distributed``), the
balance-summary cache, and sharded delegated runs (``sharding`` queues them; ``shards`` runs one shard and merges; the job
documents are in ``jobs``).

The lowest layer: nothing here imports ``find``, ``tag``, ``generate``, ``train``, ``datasets`` or ``ops``
(the capability table names their functions as ``"module:function"`` strings, resolved on use).
"""
