"""Step 4 of the road, *train*: classifiers on the (repaired) data and their evaluation.

The training recipes (``training``: vanilla, GCE, JTT, LfF, two-stage) and the recorded runs
around them (``classifier``: ``train_classifier``, ``apply_classifier``, ``evaluate_classifier``).
Depends on ``core`` and ``find``.
"""
