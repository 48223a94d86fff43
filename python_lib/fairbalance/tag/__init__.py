"""Step 2 of the road, *tag*: mark the samples a biased model gets wrong (``hardness``: the error
set or top-K losses of a GCE-trained classifier) as likely bias-conflicting.

Depends on ``core`` and ``train`` (the biased model is trained with the classifier recipes).
"""
