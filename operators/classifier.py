"""Operators: hardness tags (GCE-biased classifier), classifier training and prediction."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import runs
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.hardness import compute_hardness

from ._common import categorical_fields, field_dropdown, operator_config, progress_callback, result_view, run_key_input


def _training_inputs(inputs, epochs_default):
    backbone = types.Dropdown()
    backbone.add_choice("resnet18", label="ResNet-18 (torchvision; ImageNet weights if on disk)")
    backbone.add_choice("cnn", label="Small CNN (tiny images)")
    backbone.add_choice("mlp", label="3x100 MLP (LfF's Colored MNIST model)")
    inputs.enum("backbone", backbone.values(), default="resnet18", view=backbone, label="Backbone")
    inputs.int("image_size", default=32, min=8, label="Image size (px)")
    inputs.int("epochs", default=epochs_default, min=1, label="Epochs")
    inputs.int("batch_size", default=128, min=1, label="Batch size")
    inputs.float("lr", default=1e-3, min=0, label="Learning rate")
    inputs.int("seed", default=0, label="Seed")


def _training_params(p):
    return {
        "backbone": p.get("backbone", "resnet18"),
        "image_size": int(p.get("image_size", 32)),
        "epochs": int(p.get("epochs", 10)),
        "batch_size": int(p.get("batch_size", 128)),
        "lr": float(p.get("lr", 1e-3)),
        "seed": int(p.get("seed", 0)),
    }


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
        inputs.int("top_k", default=100, min=1, label="Top-K samples to tag")
        inputs.bool("per_class", default=True, label="Rank per class (as DiffuBias)")
        inputs.float("q", default=0.7, min=0.01, max=1.0, label="GCE q")
        inputs.str("tag", default="bias_conflicting", required=False, label="Tag")
        inputs.str("loss_field", default="bias_loss", required=False, label="Loss field")
        _training_inputs(inputs, 10)
        run_key_input(inputs, "hardness")
        return types.Property(inputs, view=types.View(label="Hardness tags"))

    def execute(self, ctx):
        p = ctx.params
        result = compute_hardness(
            ctx.target_view(),
            label_field=p["label_field"],
            loss_field=p.get("loss_field") or "bias_loss",
            tag=p.get("tag") or "bias_conflicting",
            top_k=int(p.get("top_k", 100)),
            per_class=bool(p.get("per_class", True)),
            q=float(p.get("q", 0.7)),
            run_key=p.get("run_key") or "hardness",
            overwrite=bool(p.get("overwrite", False)),
            progress=progress_callback(ctx, "Training the biased classifier"),
            **_training_params(p),
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
            "Vanilla (CE), biased (GCE) or debiased (upweight a hard tag) image classifier",
            "model_training", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if not _label_field_input(ctx, inputs):
            return types.Property(inputs)
        loss = types.RadioGroup()
        loss.add_choice("ce", label="Cross-entropy (vanilla)")
        loss.add_choice("gce", label="Generalized cross-entropy (biased)")
        inputs.enum("loss", loss.values(), default="ce", view=loss, label="Loss")
        tags = ctx.dataset.distinct("tags") if ctx.dataset is not None else []
        field_dropdown(inputs, "hard_tag", tags, "Upweight samples tagged (optional)",
                       "JTT-style debiasing: the hard set from 'tag likely bias-conflicting samples'", required=False)
        inputs.float("upweight", default=20.0, min=1.0, label="Upweight factor (lambda)")
        _training_inputs(inputs, 10)
        run_key_input(inputs, "classifier")
        return types.Property(inputs, view=types.View(label="Train classifier"))

    def execute(self, ctx):
        p = ctx.params
        clf = train_classifier(
            ctx.target_view(),
            label_field=p["label_field"],
            loss=p.get("loss", "ce"),
            hard_tag=p.get("hard_tag") or None,
            upweight=float(p.get("upweight", 20.0)) if p.get("hard_tag") else 1.0,
            run_key=p.get("run_key") or "classifier",
            overwrite=bool(p.get("overwrite", False)),
            progress=progress_callback(ctx, "Training"),
            **_training_params(p),
        )
        key = p.get("run_key") or "classifier"
        return {"run_key": key, "checkpoint": runs.get_run_config(ctx.dataset, key)["checkpoint"],
                "final_train_accuracy": clf.history[-1]["train_accuracy"]}

    def resolve_output(self, ctx):
        return result_view(
            "Classifier trained",
            ("run_key", "str", "Run key (use it in 'apply classifier')"),
            ("checkpoint", "str", "Checkpoint"),
            ("final_train_accuracy", "float", "Final train accuracy"),
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
