"""Operators: hardness tags (GCE-biased classifier), classifier training and prediction."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import runs
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.hardness import compute_hardness

from ._common import categorical_fields, field_dropdown, operator_config, progress_callback, result_view, run_key_input


def _training_inputs(inputs, epochs_default):
    backbone = types.Dropdown()
    backbone.add_choice("auto", label="Auto: LfF's 3x100 MLP up to 32 px, ResNet-18 above")
    backbone.add_choice("resnet18", label="ResNet-18 (torchvision)")
    backbone.add_choice("cnn", label="Small CNN (tiny images)")
    backbone.add_choice("mlp", label="3x100 MLP (LfF's Colored MNIST model)")
    inputs.enum("backbone", backbone.values(), default="auto", view=backbone, label="Backbone")
    inputs.bool("pretrained", default=False, label="ImageNet weights (ResNet-18; must be on disk)")
    inputs.int("image_size", required=False, min=8, label="Image size (px)",
               description="Leave empty to train at the images' native size")
    norm = types.Dropdown()
    norm.add_choice("none", label="Pixels in [0, 1]")
    norm.add_choice("dataset", label="Normalised with the training images' statistics")
    norm.add_choice("imagenet", label="Normalised with ImageNet statistics (pretrained ResNet)")
    inputs.enum("normalize", norm.values(), default="none", view=norm, label="Input normalisation")
    inputs.int("epochs", default=epochs_default, min=1, label="Epochs")
    inputs.int("batch_size", default=256, min=1, label="Batch size")
    inputs.float("lr", default=1e-3, min=0, label="Learning rate")
    inputs.int("seed", default=0, label="Seed")


TRAINING_PARAMS = ("backbone", "pretrained", "image_size", "normalize", "epochs", "batch_size", "lr", "seed")


def _given(p, names):
    """Only the values the user set, so the library's defaults apply to the rest."""
    return {n: p[n] for n in names if p.get(n) not in (None, "")}


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
        inputs.float("top_k", required=False, min=0, label="How many to tag (optional)",
                     description="Empty: the samples the biased model gets wrong (its error set; needs no bias "
                                 "labels). A number >= 1: that many highest-loss samples; below 1: that fraction "
                                 "of the view (0.01 = 1%)")
        inputs.bool("per_class", default=True, label="Rank per class (as DiffuBias)")
        inputs.float("q", default=0.7, min=0.01, max=1.0, label="GCE q")
        inputs.str("tag", default="bias_conflicting", required=False, label="Tag")
        inputs.str("loss_field", default="bias_loss", required=False, label="Loss field")
        _training_inputs(inputs, 10)
        run_key_input(inputs, "hardness")
        return types.Property(inputs, view=types.View(label="Hardness tags"))

    def execute(self, ctx):
        p = ctx.params
        top_k = p.get("top_k")
        if top_k is not None:
            top_k = int(top_k) if float(top_k) >= 1 else float(top_k)
        result = compute_hardness(
            ctx.target_view(),
            label_field=p["label_field"],
            top_k=top_k,
            progress=progress_callback(ctx, "Training the biased classifier"),
            **_given(p, ("loss_field", "tag", "per_class", "q", "run_key", "overwrite") + TRAINING_PARAMS),
        )
        ctx.ops.reload_dataset()
        return result.to_dict()

    def resolve_output(self, ctx):
        return result_view(
            "Hardness tags computed",
            ("num_tagged", "int", "Samples tagged"),
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
        method.add_choice("biased", label="Biased (generalized cross-entropy)")
        inputs.enum("method", method.values(), default="vanilla", view=method, label="Method")
        tags = ctx.dataset.distinct("tags") if ctx.dataset is not None else []
        if ctx.params.get("method") == "jtt":
            field_dropdown(inputs, "hard_tag", tags, "Upweight samples tagged",
                           "The tag of 'tag likely bias-conflicting samples'", default="bias_conflicting"
                           if "bias_conflicting" in tags else None)
            inputs.float("upweight", default=50.0, min=1.0, label="Upweight factor (lambda)")
        field_dropdown(inputs, "val_tag", tags, "Validation tag (optional)",
                       "Keep the epoch with the best accuracy on the samples with this tag (e.g. an unbiased "
                       "validation split)", required=False, default="val" if "val" in tags else None)
        _training_inputs(inputs, 100)
        run_key_input(inputs, "classifier")
        return types.Property(inputs, view=types.View(label="Train classifier"))

    def execute(self, ctx):
        p = ctx.params
        val = ctx.dataset.match_tags(p["val_tag"]) if p.get("val_tag") else None
        given = _given(p, ("method", "hard_tag", "upweight", "run_key", "overwrite") + TRAINING_PARAMS)
        clf = train_classifier(ctx.target_view(), label_field=p["label_field"], val_samples=val,
                               progress=progress_callback(ctx, "Training"), **given)
        key = given.get("run_key", "classifier")
        last = clf.history[-1]
        return {"run_key": key, "checkpoint": runs.get_run_config(ctx.dataset, key)["checkpoint"],
                "final_train_accuracy": round(last["train_accuracy"], 4), "best_epoch": clf.best_epoch,
                "model_selection": clf.config.model_selection,
                "num_generated_used": clf.num_generated_used}

    def resolve_output(self, ctx):
        return result_view(
            "Classifier trained",
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
        inputs.str("predictions_field", default="predictions", required=False, label="Predictions field")
        fields = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "attribute_field", fields, "Attribute for worst-group accuracy (optional)",
                       "e.g. the bias attribute", required=False)
        return types.Property(inputs, view=types.View(label="Apply classifier"))

    def execute(self, ctx):
        p = ctx.params
        view = ctx.target_view()
        cfg = runs.get_run_config(ctx.dataset, p["classifier_run"])
        field = p.get("predictions_field") or "predictions"
        ctx.set_progress(progress=0.1, label="Predicting")
        apply_classifier(view, cfg["checkpoint"], field, run_key=f"{field}_apply", overwrite=True)
        aligned = "bias_aligned" if ctx.dataset.has_field("bias_aligned") else None
        ev = evaluate_classifier(view, field, cfg["label_field"], attribute_field=p.get("attribute_field") or None,
                                 aligned_field=aligned, run_key=f"{field}_eval", overwrite=True)
        ctx.ops.reload_dataset()
        return ev.to_dict()

    def resolve_output(self, ctx):
        return result_view(
            "Predictions written",
            ("accuracy", "float", "Accuracy"),
            ("conflicting_accuracy", "float", "Accuracy on bias-conflicting samples"),
            ("worst_group_accuracy", "float", "Worst-group accuracy"),
            ("worst_group", "str", "Worst group (class|attribute)"),
        )
