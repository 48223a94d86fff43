"""Operator: can a small classifier tell the generated images from real ones? (``fairbalance.measure_realism``)"""

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fairbalance import FairBalanceError, measure_realism

from ._common import LIMITS, streams_progress
from ._common import (categorical_fields, check_realism, default_of, field_dropdown, given, named_view, named_views,
                      operator_config, progress_callback, refuse, result_view, rounded, run_key_input, set_dropdown)

# the default sets: the view's own generated samples, and the rest of the view (the SDK's split of one view)
VIEW_GENERATED, VIEW_REST = "__view_generated__", "__view_rest__"
SETTINGS = ("discriminator", "folds", "epochs", "tstr_epochs", "max_samples", "seed")


def _label_default(ctx):
    fields = categorical_fields(ctx.dataset)
    return "ground_truth" if "ground_truth" in fields else None


def arguments(ctx):
    """``measure_realism``'s arguments from the form: the sets by name (saved view or tag) or the view's own split.

    Both sets left as the view's: the view itself (the SDK's ``measure_realism(view)``, split by ``generated``).
    One named: the other is the view's generated samples, or the view's samples that are not generated. Test
    split and reference are saved views or tags of the dataset.
    """
    p, view, ds = ctx.params, ctx.target_view(), ctx.dataset
    generated, real = p.get("generated") or VIEW_GENERATED, p.get("real") or VIEW_REST
    if generated == VIEW_GENERATED and real == VIEW_REST:
        real_samples, generated_samples = view, None
    else:
        # the SDK's own split of a view (measure_realism(view)), expression for expression
        gen_expr, real_expr = F("generated") == True, F("generated") != True  # noqa: E712
        generated_samples = view.match(gen_expr) if generated == VIEW_GENERATED else named_view(ds, generated)
        real_samples = view.match(real_expr) if real == VIEW_REST else named_view(ds, real)
    out = {"real_samples": real_samples, "generated_samples": generated_samples,
           "label_field": p.get("label_field", _label_default(ctx)) or None,
           "attribute_field": p.get("attribute_field") or None,
           "test_samples": named_view(ds, p["test_split"]) if p.get("test_split") else None,
           "reference_samples": named_view(ds, p["reference"]) if p.get("reference") else None,
           **given(p, SETTINGS)}
    if out["reference_samples"] is not None:
        out["match_cells"] = bool(p.get("match_cells", False))
    return out


class MeasureRealism(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "measure_realism", "fairbalance: measure realism of generated samples",
            "Can a small classifier tell the generated images from real ones? Two-sample test (against a "
            "reference split too), train-on-generated accuracy, brightness",
            "fact_check", delegated="optional",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        names = named_views(ctx.dataset)
        set_dropdown(inputs, "generated", {VIEW_GENERATED: "The view's generated samples (generated == True)"},
                     names, "Generated samples", "The images to judge: the view's generated samples, or a saved "
                                                 "view or tag", required=False, default=VIEW_GENERATED)
        set_dropdown(inputs, "real", {VIEW_REST: "The rest of the view (its samples that are not generated)"}, names,
                     "Real samples", "What they must pass for: the view's real samples, or a saved view or tag",
                     required=False, default=VIEW_REST)
        fields = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "label_field", fields, "Label field (optional)",
                       "The class both sets carry: statistics per class and the train-on-generated / test-on-real "
                       "accuracy (TSTR); empty to skip them", required=False, default=_label_default(ctx))
        field_dropdown(inputs, "attribute_field", fields, "Attribute field (optional)",
                       "Statistics per class x attribute cell; needed to match a reference's cells", required=False)
        set_dropdown(inputs, "test_split", {}, names, "Test split for TSTR (optional)",
                     "Real images the train-on-generated classifier is tested on, e.g. an unbiased test split "
                     "(default: a held-out half of the real samples)", required=False)
        set_dropdown(inputs, "reference", {}, names, "Reference (optional)",
                     "Real images held out from both sets, e.g. an unbiased split that has the generated cells: "
                     "a second two-sample figure against them", required=False)
        if ctx.params.get("reference"):
            inputs.bool("match_cells", default=default_of(measure_realism, "match_cells"),
                        label="Match the reference to the generated cells",
                        description="Weight the reference so that each class x attribute cell has its share of the "
                                    "generated set (needs the label and attribute fields)")
        _check(ctx, inputs)  # here, under the sets it is about, not below the settings
        disc = types.RadioGroup()
        disc.add_choice("mlp", label="3x100 MLP (LfF's Colored MNIST model)")
        disc.add_choice("cnn", label="Small CNN")
        inputs.enum("discriminator", disc.values(), default=default_of(measure_realism, "discriminator"), view=disc,
                    label="Discriminator")
        inputs.int("folds", default=default_of(measure_realism, "folds"), min=2, label="Folds",
                   description="Every image is scored by a discriminator trained on the other folds")
        inputs.int("epochs", default=default_of(measure_realism, "epochs"), min=1, max=LIMITS["epochs"],
                   label="Discriminator epochs")
        inputs.int("tstr_epochs", default=default_of(measure_realism, "tstr_epochs"), min=1,
                   label="TSTR classifier epochs")
        inputs.int("max_samples", default=default_of(measure_realism, "max_samples"), min=1,
                   label="At most this many images per set", description="A seeded sample of larger sets")
        inputs.int("seed", default=default_of(measure_realism, "seed"), min=0, max=LIMITS["seed"], label="Seed")
        run_key_input(ctx, inputs, measure_realism)
        return types.Property(inputs, view=types.View(label="Measure realism"))

    @streams_progress
    def execute(self, ctx):
        res = measure_realism(**arguments(ctx), progress=progress_callback(ctx, "Discriminator folds and classifiers"),
                              **given(ctx.params, ("run_key", "overwrite")))
        return rounded({**res.to_dict(), **readings(res)})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Realism measured",
            ("reading", "str", "In plain words"),
            ("two_sample_accuracy", "float", "Real-vs-generated accuracy (0.5 = indistinguishable, 1 = separable)"),
            ("reference_two_sample_accuracy", "float", "The same against the reference"),
            ("reference_cells", "str", "Reference cells compared"),
            ("tstr", "str", "Trained on generated, tested on real (TSTR)"),
            ("trtr", "str", "The same classifier trained on as many real images (TRTR)"),
            ("intensity_ratio", "float", "Brightness, generated / real"),
            ("reference_intensity_ratio", "float", "Brightness, generated / reference"),
            ("warnings_text", "text", "Warnings"),
            ("cell_table", "table", "Per class (x attribute) cell, worst brightness ratio first", CELL_COLUMNS),
            ("run_key", "str", "Run key"),
        )


def _check(ctx, inputs):
    """The library's own refusals (:func:`fairbalance.measure_realism`), said before Execute; else what is compared."""
    try:
        plan = check_realism(**arguments(ctx))
    except (FairBalanceError, OSError) as e:
        refuse(inputs, "refused", str(e))
        return
    line = f"{plan['num_generated']} generated and {plan['num_real']} real images will be compared"
    if plan.get("reference_num_real") is not None:
        line += f"; against {plan['reference_num_real']} reference images"
        if plan.get("reference_cells_total") is not None:
            line += (f" ({plan['reference_num_generated']} generated images, in the {plan['reference_cells_matched']} "
                     f"of {plan['reference_cells_total']} generated cells the reference has)")
    inputs.view("plan", types.Notice(label=line))


CELL_COLUMNS = {"cell": "Cell", "real": "Real images", "generated": "Generated images",
                "real_intensity": "Real brightness", "generated_intensity": "Generated brightness",
                "ratio": "Generated / real"}


def readings(res):
    """The result in words: a sentence, TSTR / TRTR in percent, warnings as lines, the per-cell table."""
    reading = (f"A small discriminator ({res.discriminator}) tells the {res.num_generated} generated images from "
               f"{res.num_real} real ones {res.two_sample_accuracy:.1%} of the time (balanced, held out; 50% = they "
               f"pass for real, 100% = trivially separable)")
    if res.reference_two_sample_accuracy is not None:
        reading += f"; against the reference, {res.reference_two_sample_accuracy:.1%}"
    out = {"reading": reading, "warnings_text": "\n".join(f"- {w}" for w in res.warnings) or None,
           "reference_cells": None if res.reference_cells_total is None else
           f"{res.reference_cells_matched} of {res.reference_cells_total} generated cells have reference images",
           "cell_table": _cell_rows(res.cell_statistics) or None}
    if res.tstr_accuracy is not None:
        out["tstr"] = (f"{res.tstr_accuracy:.1%} (trained on {res.num_tstr_train} generated images, tested on "
                       f"{res.num_tstr_test} real ones)")
        out["trtr"] = f"{res.trtr_accuracy:.1%} (trained on {res.num_tstr_train} real images, same test)"
    return out


def _cell_rows(cells):
    rows = []
    for cell, sides in cells.items():
        real, gen = sides.get("real", {}), sides.get("generated", {})
        ri, gi = real.get("mean_intensity"), gen.get("mean_intensity")
        rows.append({"cell": cell, "real": real.get("count", 0), "generated": gen.get("count", 0),
                     "real_intensity": ri, "generated_intensity": gi,
                     "ratio": round(gi / ri, 2) if ri and gi is not None else None})
    return sorted(rows, key=lambda r: (r["ratio"] is None, -abs((r["ratio"] or 1) - 1), r["cell"]))
