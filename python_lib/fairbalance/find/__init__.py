"""Step 1 of the road, *find*: measure where a dataset is imbalanced, with or without labels.

CLIP features for a text-specified attribute (``sa_features``, with ``related_texts``,
``resources`` and ``embeddings``), X-means pseudo-labels (``clustering``, ``pseudo_labels``),
balance reports and summaries (``balance``) and all three in one call (``audit``).
Depends on ``core`` only.
"""
