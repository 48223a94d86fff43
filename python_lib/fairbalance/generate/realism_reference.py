"""The two-sample test against an explicit real reference, optionally matched to the generated cells' mix.

Against the real training images a generated set that fills the
bias-conflicting cells is told from real even when every image is real:
those cells are exactly what a biased training set lacks (a discriminator
reads "a 3 in red" as generated however real the 3 is). A reference that
has such cells (an unbiased, held-out split) asks the question that
matters: do the generated images pass for real images *of their cell*?
With ``match_cells`` the reference is weighted so that each class x
attribute cell has the share it has in the generated set (generated images
of a cell the reference lacks are left out of this figure and counted).

Used by :func:`fairbalance.generate.realism.measure_realism`
(``reference_samples=``, ``match_cells=``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fairbalance.core import validation


def check(reference_samples, real_samples, generated_samples, label_field, attribute_field, match_cells) -> None:
    """Refuse a reference that cannot measure anything, before any run or image is touched."""
    from fiftyone import ViewField as Fv

    if match_cells not in (True, False):
        raise validation.FairBalanceError(f"match_cells must be True or False, not {match_cells!r}")
    if reference_samples is None:
        if match_cells:
            raise validation.FairBalanceError("match_cells=True matches a reference to the generated cells: "
                                              "pass reference_samples (e.g. an unbiased held-out split)")
        return
    if not hasattr(reference_samples, "_root_dataset"):
        raise validation.FairBalanceError("reference_samples must be a FiftyOne dataset or view of real samples")
    try:
        validation.require_nonempty(reference_samples)
    except validation.FairBalanceError:
        raise validation.FairBalanceError("reference_samples is empty: select real samples to compare with") from None
    if match_cells and (not label_field or not attribute_field):
        raise validation.FairBalanceError("match_cells=True needs both a label_field and an attribute_field: "
                                          "the cells are class x attribute")
    if match_cells:
        validation.require_fields(reference_samples, [label_field, attribute_field])
    if "generated" in reference_samples.get_field_schema() and \
            len(reference_samples.match(Fv("generated") == True).limit(1)):  # noqa: E712
        raise validation.FairBalanceError("reference_samples holds generated samples (generated == True): the "
                                          "reference must be real images")
    ref = set(reference_samples.values("filepath"))
    for name, view in (("generated", generated_samples), ("real", real_samples)):
        shared = ref & set(view.values("filepath"))
        if shared:
            raise validation.FairBalanceError(
                f"reference_samples shares {len(shared)} image(s) with the {name} samples (e.g. "
                f"{sorted(shared)[0]!r}): the reference must be held out from both sets")


def cell_weights(ref_cells: list, gen_cells: list) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Weights of the reference images giving each cell the generated set's share, and which generated images
    are measured.

    Returns ``(ref_weights, gen_keep, matched, total)``: a reference image
    outside every generated cell weighs 0; a generated image of a cell the
    reference lacks is not measured (``gen_keep`` False); ``matched`` of the
    ``total`` generated cells (unlabelled images have no cell) have both.
    Weights are scaled to mean 1 over the weighted reference images.
    """
    g, r = Counter(c for c in gen_cells if c is not None), Counter(c for c in ref_cells if c is not None)
    matched = {c for c in g if r[c] > 0}
    g_total, r_total = sum(g[c] for c in matched), sum(r[c] for c in matched)
    weights = np.array([(g[c] / g_total) / (r[c] / r_total) if c in matched else 0.0 for c in ref_cells])
    keep = weights > 0
    if keep.any():
        weights[keep] /= weights[keep].mean()
    return weights, np.array([c in matched for c in gen_cells], dtype=bool), len(matched), len(g)
