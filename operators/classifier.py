"""Operators: hardness tags (GCE-biased classifier), classifier training and prediction."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import apply_classifier, compute_hardness_tags, evaluate_classifier, train_classifier

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, runs, classifier_and_shards_input
from ._common import (categorical_fields, default_of, field_dropdown, given, operator_config, progress_callback,
                      result_view, rounded, run_key_input)


def _training_inputs(inputs, fn):
    """The training settings shared by the hardness and classifier forms, with ``fn``'s defaults."""
    backbone = types.Dropdown()
    backbone.add_choice("auto", label="Auto: LfF's 3x100 MLP up to 32 px, ResNet-18 above")
    backbone.add_choice("resnet18", label="ResNet-18 (torchvision)")
    backbone.add_choice("cnn", label="Small CNN (tiny images)")
    backbone.add_choice("mlp", label="3x100 MLP (LfF's Colored MNIST model)")
    inputs.enum("backbone", backbone.values(), default=default_of(fn, "backbone"), view=backbone, label="Backbone")
    inputs.bool("pretrained", default=default_of(fn, "pretrained"),
                label="ImageNet weights (ResNet-18; must be on disk)")
    inputs.int("image_size", required=False, min=8, max=LIMITS["image_size"], label="Image size (px)",
               description="Leave empty to train at the images' native size")
    norm = types.Dropdown()
    norm.add_choice("none", label="Pixels in [0, 1]")
    norm.add_choice("dataset", label="Normalised with the training images' statistics")
    norm.add_choice("imagenet", label="Normalised with ImageNet statistics (pretrained ResNet)")
    inputs.enum("normalize", norm.values(), default=default_of(fn, "normalize"), view=norm, label="Input normalisation")
    inputs.int("epochs", default=default_of(fn, "epochs"), min=1, max=LIMITS["epochs"], label="Epochs")
    inputs.int("batch_size", default=default_of(fn, "batch_size"), min=1, max=LIMITS["batch_size"], label="Batch size")
    inputs.float("lr", default=default_of(fn, "lr"), min=0, label="Learning rate")
    inputs.int("seed", default=default_of(fn, "seed"), max=LIMITS["seed"], label="Seed")


TRAINING_PARAMS = ("backbone", "pretrained", "image_size", "normalize", "epochs", "batch_size", "lr", "seed")


def _label_field_input(ctx, inputs):
    fields = categorical_fields(ctx.dataset)
    if not fields:
        inputs.view("no_fields", types.Error(label="No label field", description="The view needs class labels"))
        return False
    default = "ground_truth" if "ground_truth" in fields else fields[0]
    field_dropdown(inputs, "label_field", fields, "Label field", "Class labels to train on", default=default)
    return True


class ComputeHardnessTags(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "compute_hardness_tags", "fairbalance: tag likely bias-conflicting samples",
            "Train a deliberately biased (GCE) classifier and tag the samples with the highest loss",
            "local_offer",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if not _label_field_input(ctx, inputs):
            return types.Property(inputs)
        prop = inputs.float("top_k", required=False, min=0, label="How many to tag (optional)",
                            description="Empty: the samples the biased model gets wrong (its error set; needs no "
                                        "bias labels). A number >= 1: that many highest-loss samples; below 1: that "
                                        "fraction of the view (0.01 = 1%)")
        top_k, size = ctx.params.get("top_k"), len(ctx.target_view())
        if top_k is not None and not 0 < top_k <= max(1, size):
            prop.invalid = True
            prop.error_message = f"Between 0 and the {size} samples of the view (empty: the biased model's errors)"
        inputs.bool("per_class", default=default_of(compute_hardness_tags, "per_class"), label="Rank per class",
                    description="With a count: the highest losses of each class, as DiffuBias does")
        inputs.str("tag", default=default_of(compute_hardness_tags, "tag"), required=False, label="Tag")
        inputs.str("loss_field", default=default_of(compute_hardness_tags, "loss_field"), required=False,
                   label="Loss field")
        if not classifier_and_shards_input(
                ctx, inputs, "Trained biased classifier (optional)",
                "The folder of a classifier trained already (train classifier, method 'biased'): it is used as is, "
                "nothing is trained. Needed with Shards > 1", "the losses", "ranks, tags and records the run"):
            inputs.float("q", default=default_of(compute_hardness_tags, "q"), min=0.01, max=1.0, label="GCE q",
                         description="Generalized cross-entropy exponent: higher = the model leans harder on easy "
                                     "(bias-aligned) samples; 0.7 as in LfF and the papers")
            _training_inputs(inputs, compute_hardness_tags)
        run_key_input(ctx, inputs, compute_hardness_tags)
        return types.Property(inputs, view=types.View(label="Hardness tags"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        top_k = p.get("top_k")
        if top_k is not None:
            top_k = int(top_k) if float(top_k) >= 1 else float(top_k)
        classifier = (p.get("classifier") or "").strip() or None
        settings = ("loss_field", "tag", "per_class", "run_key", "overwrite") + (
            () if classifier else ("q",) + TRAINING_PARAMS)
        kwargs = dict(label_field=p["label_field"], top_k=top_k, **given(p, settings))
        if classifier:
            kwargs.update(classifier=classifier, **given(p, ("batch_size",)))
        queued = queue_shards(ctx, "compute_hardness_tags", **kwargs)
        if queued:
            return queued
        result = compute_hardness_tags(
            ctx.target_view(),
            progress=progress_callback(ctx, "Predicting" if classifier else "Training the biased classifier"),
            **kwargs,
        )
        refresh_app(ctx)
        out = rounded(result.to_dict())
        out["tagged_of"] = f"{result.num_tagged} of {result.num_samples} samples of the view"
        return out

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Hardness tags computed",
            *SHARD_OUTPUTS,
            ("tagged_of", "str", "Samples tagged"),
            ("tag", "str", "Tag"),
            ("loss_field", "str", "Loss field"),
            ("checkpoint", "str", "Biased model checkpoint"),
        )


class TrainClassifier(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "train_classifier", "fairbalance: train a classifier",
            "Vanilla, LfF, JTT or real + generated samples; predictions via 'apply classifier'",
            "model_training", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if not _label_field_input(ctx, inputs):
            return types.Property(inputs)
        method = types.RadioGroup()
        method.add_choice("vanilla", label="Vanilla (cross-entropy)")
        method.add_choice("lff", label="LfF: Learning from Failure (a biased and a debiased model together)")
        method.add_choice("jtt", label="JTT: upweight the samples of a tag (the hardness tags)")
        method.add_choice("synthetic", label="Real + generated samples (those carrying the class label)")
        method.add_choice("two_stage", label="Two-stage: CE + SupCon on generated samples, then the linear head on "
                                             "the real ones")
        method.add_choice("biased", label="Biased (generalized cross-entropy)")
        inputs.enum("method", method.values(), default=default_of(train_classifier, "method"), view=method,
                    label="Method")
        tags = ctx.dataset.distinct("tags") if ctx.dataset is not None else []
        if ctx.params.get("method") == "jtt":
            field_dropdown(inputs, "hard_tag", tags, "Upweight samples tagged",
                           "The tag of 'tag likely bias-conflicting samples'", default="bias_conflicting"
                           if "bias_conflicting" in tags else None)
            inputs.float("upweight", default=default_of(train_classifier, "upweight"), min=1.0,
                         label="Upweight factor (lambda)")
        if ctx.params.get("method") == "two_stage":
            inputs.float("supcon_weight", default=default_of(train_classifier, "supcon_weight"), min=0,
                         label="SupCon weight", description="Stage 1 loss: CE + this x supervised contrastive")
            inputs.float("supcon_temperature", default=default_of(train_classifier, "supcon_temperature"), min=0,
                         label="SupCon temperature")
            inputs.int("head_epochs", default=default_of(train_classifier, "head_epochs"), min=1,
                       max=LIMITS["head_epochs"], label="Stage 2 epochs (linear head on the real samples)")
            inputs.bool("stage1_real", default=default_of(train_classifier, "stage1_real"),
                        label="Stage 1 on generated + real samples")
        field_dropdown(inputs, "val_tag", tags, "Validation tag (optional)",
                       "Keep the epoch with the best accuracy on the samples with this tag (e.g. an unbiased "
                       "validation split)", required=False, default="val" if "val" in tags else None)
        if ctx.params.get("val_tag") and ctx.params.get("method") != "biased":
            inputs.bool("refit_head", default=default_of(train_classifier, "refit_head"),
                        label="Refit the last layer on the validation samples (DFR)",
                        description="After training, the last layer is refitted on the tagged samples, every "
                                    "class weighing the same (they then train the model: no epoch is picked on them)")
        _training_inputs(inputs, train_classifier)
        run_key_input(ctx, inputs, train_classifier)
        return types.Property(inputs, view=types.View(label="Train classifier"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        val = ctx.dataset.match_tags(p["val_tag"]) if p.get("val_tag") else None
        clf = train_classifier(ctx.target_view(), label_field=p["label_field"], val_samples=val,
                               progress=progress_callback(ctx, "Training"),
                               **given(p, ("method", "hard_tag", "upweight", "run_key", "overwrite", "supcon_weight",
                                           "supcon_temperature", "head_epochs", "stage1_real", "refit_head")
                                         + TRAINING_PARAMS))
        last = clf.history[-1]
        return rounded({"run_key": clf.run_key, "checkpoint": clf.checkpoint,
                        "final_train_accuracy": last["train_accuracy"], "best_epoch": clf.best_epoch,
                        "model_selection": MODEL_SELECTION.get(clf.config.model_selection,
                                                               clf.config.model_selection),
                        "num_generated_used": clf.num_generated_used})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Classifier trained",
            ("run_key", "str", "Run key (use it in 'apply classifier')"),
            ("checkpoint", "str", "Checkpoint"),
            ("final_train_accuracy", "float", "Final train accuracy"),
            ("model_selection", "str", "Model selection"),
            ("best_epoch", "int", "Epoch kept"),
            ("num_generated_used", "int", "Generated samples used"),
        )


class ApplyClassifier(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "apply_classifier", "fairbalance: apply a classifier",
            "Predict with a trained classifier and evaluate (accuracy, conflicting, worst group)",
            "online_prediction",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        keys = runs.list_runs(ctx.dataset, "train_classifier") if ctx.dataset is not None else []
        if not keys:
            inputs.view("no_model", types.Error(label="No trained classifier", description="Train one first"))
            return types.Property(inputs)
        field_dropdown(inputs, "classifier_run", keys, "Classifier", "A run of 'train a classifier'", default=keys[-1])
        prop = inputs.str("predictions_field", default=default_of(apply_classifier, "predictions_field"),
                          required=False, label="Predictions field")
        inputs.bool("overwrite", default=False, label="Overwrite", description="Replace earlier predictions there")
        field = ctx.params.get("predictions_field") or default_of(apply_classifier, "predictions_field")
        if ctx.dataset is not None and ctx.dataset.has_field(field) and not ctx.params.get("overwrite"):
            owned = ctx.dataset.has_run(field) and field in runs.get_run_config(ctx.dataset, field).get(
                "fields_written", [])
            prop.invalid = True
            prop.error_message = (f"'{field}' holds earlier predictions: tick Overwrite or choose another field"
                                  if owned else f"'{field}' is a field fairbalance did not write: choose another")
        fields = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "attribute_field", fields, "Attribute for worst-group accuracy (optional)",
                       "e.g. the bias attribute", required=False)
        return types.Property(inputs, view=types.View(label="Apply classifier"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        view = ctx.target_view()
        ctx.set_progress(progress=0.0, label="Predicting")
        applied = apply_classifier(view, classifier_run=p["classifier_run"],
                                   progress=progress_callback(ctx, "Predicting"),
                                   **given(p, ("predictions_field", "overwrite")))
        label_field = runs.get_run_config(ctx.dataset, p["classifier_run"])["label_field"]
        aligned = "bias_aligned" if ctx.dataset.has_field("bias_aligned") else None
        ev = evaluate_classifier(view, applied.predictions_field, label_field,
                                 attribute_field=p.get("attribute_field") or None, aligned_field=aligned,
                                 run_key=f"{applied.predictions_field}_eval", overwrite=True)
        refresh_app(ctx)
        out = {k: v for k, v in ev.to_dict().items() if v is not None}
        for key in ("accuracy", "aligned_accuracy", "conflicting_accuracy"):
            if out.get(key) is not None:
                out[key] = f"{100 * out[key]:.1f}%"
        out.pop("worst_group", None), out.pop("worst_group_accuracy", None)
        if ev.group_accuracy and p.get("attribute_field"):
            out.update(_group_rows(view, label_field, p["attribute_field"], ev.group_accuracy))
        return rounded({**out, "predictions_field": applied.predictions_field})

    def resolve_output(self, ctx):
        rows = [("predictions_field", "str", "Predictions written to"), ("accuracy", "float", "Accuracy")]
        res = ctx.results or {}
        if res.get("conflicting_accuracy") is not None:
            rows += [("aligned_accuracy", "float", "Accuracy on bias-aligned samples"),
                     ("conflicting_accuracy", "float", "Accuracy on bias-conflicting samples")]
        if res.get("worst_group") is not None:
            rows += [("worst_group", "str", "Worst group"),
                     ("group_table", "table", "Accuracy per group, worst first",
                      {"group": "Group", "samples": "Samples", "accuracy": "Accuracy", "note": "Note"})]
        return result_view(ctx, "Predictions written", *rows)


#: What ``TrainConfig.model_selection`` means, for people.
MODEL_SELECTION = {"last_epoch": "the last epoch's weights (no validation set given)",
                   "best_val_accuracy": "the epoch with the best validation accuracy",
                   "last_epoch (the validation view is empty)": "the last epoch's weights (the validation view is empty)",
                   "last_epoch (val_samples train DFR's last layer)":
                       "the last epoch's weights, the last layer refitted on the validation samples"}


def _group_rows(view, label_field, attribute_field, group_accuracy):
    """Per class x attribute group: its name in words, sample count and accuracy (worst first), small groups
    flagged and left out of the worst group (a 1-sample group at 0% says nothing)."""
    from collections import Counter

    from ._common import SMALL_GROUP

    counts = Counter(f"{c}|{a}" for c, a in zip(*view.values([f"{label_field}.label", f"{attribute_field}.label"])))
    rows = []
    for group, acc in sorted(group_accuracy.items(), key=lambda ga: (ga[1], str(ga[0]))):
        n = counts.get(group, counts.get(str(group), 0))
        rows.append({"group": _group_name(group, label_field, attribute_field), "samples": n,
                     "accuracy": f"{100 * acc:.1f}%", "_acc": acc,
                     "note": f"small (under {SMALL_GROUP} samples): not ranked" if n < SMALL_GROUP else ""})
    ranked = [r for r in rows if not r["note"]] or rows
    worst = ranked[0]
    for r in rows:
        r.pop("_acc")
    return {"group_table": rows,
            "worst_group": f"{worst['group']}: {worst['accuracy']} of {worst['samples']} samples"
                           + ("" if ranked is not rows else " (every group is small)")}


def _group_name(group, label_field="class", attribute_field="attribute"):
    """A "class|attribute" group in words ("ground_truth 0, color blue"); samples without the attribute (e.g.
    generated ones) say so."""
    cls, sep, attr = str(group).partition("|")
    if not sep:
        return str(group)
    return f"{label_field} {cls}, {attribute_field} " + ("(no value)" if attr in ("None", "") else attr)
