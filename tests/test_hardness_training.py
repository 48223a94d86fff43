import fiftyone as fo
import numpy as np
import pytest
import torch
from PIL import Image

from fairbalance import runs, training
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.hardness import compute_hardness, hardest, loss_ranks
from fairbalance.validation import FairBalanceError

FAST = dict(backbone="mlp", pretrained=False, image_size=16, epochs=3, batch_size=64)


def test_gce_loss_matches_definition_and_limits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)[torch.arange(2), y]
    assert torch.allclose(training.gce_loss(logits, y, 0.7), (1 - p**0.7) / 0.7)
    # q -> 0 approaches cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(training.gce_loss(logits, y, 1e-4), ce, atol=1e-3)
    # gradient is p_y^q times the CE gradient: easy samples weigh more
    lg = logits.clone().requires_grad_(True)
    training.gce_loss(lg, y, 0.7).sum().backward()
    lc = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(lc, y, reduction="sum").backward()
    assert torch.allclose(lg.grad, lc.grad * (p**0.7)[:, None], atol=1e-6)


def test_top_k_per_class_and_global():
    losses = np.array([5, 4, 3, 2, 1, 10, 0.5, 0.4])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert list(loss_ranks(losses, labels, per_class=False)) == [2, 3, 4, 5, 6, 1, 7, 8]
    assert list(loss_ranks(losses, labels, per_class=True)) == [1, 2, 3, 4, 5, 1, 2, 3]
    assert list(hardest(loss_ranks(losses, labels, False), labels, 3, per_class=False)) == [0, 1, 5]
    picked = hardest(loss_ranks(losses, labels, True), labels, 4, per_class=True)  # quotas 5:3 of 4 -> 3 and 1
    assert list(picked) == [0, 1, 2, 5]


def test_hardness_tags_conflicting_samples(digits_copy):
    train = digits_copy.match_tags("train")
    n_conf = len(train.match({"bias_aligned": False}))  # 20 of 300
    result = compute_hardness(train, top_k=40, epochs=8, seed=0, **{k: v for k, v in FAST.items() if k != "epochs"})
    tagged = digits_copy.match_tags("bias_conflicting")
    assert len(tagged) == result.num_tagged == 40
    precision = len(tagged.match({"bias_aligned": False})) / 40
    assert precision > 3 * n_conf / len(train)  # far better than random tagging
    assert digits_copy.count("bias_loss") == len(train)
    assert set(train.values("bias_loss_rank")) >= {1, 2, 3}
    assert sum(result.per_class_tagged.values()) == 40
    cfg = runs.get_run_config(digits_copy, "hardness")
    assert cfg["q"] == 0.7 and cfg["top_k"] == 40 and cfg["seed"] == 0
    clf = training.load_classifier(result.checkpoint)
    assert clf.config.loss == "gce" and clf.classes == [str(c) for c in range(10)]
    # retagging replaces, never accumulates
    compute_hardness(train, top_k=10, seed=1, overwrite=True, **FAST)
    assert len(digits_copy.match_tags("bias_conflicting")) == 10


def test_hardness_fraction_and_bad_input(digits_copy):
    train = digits_copy.match_tags("train")
    with pytest.raises(FairBalanceError, match="larger than"):
        compute_hardness(train, top_k=10_000, **FAST)
    with pytest.raises(FairBalanceError, match="one class"):
        compute_hardness(train.match({"ground_truth.label": "3"}), top_k=5, **FAST)
    with pytest.raises(FairBalanceError, match="not found"):
        compute_hardness(train, label_field="nope", **FAST)
    assert not digits_copy.has_field("bias_loss") and not digits_copy.match_tags("bias_conflicting")
    result = compute_hardness(train, top_k=0.05, per_class=False, **FAST)
    assert result.num_tagged == 15


def test_training_is_deterministic_and_skips_unlabelled(digits_copy):
    train = digits_copy.match_tags("train")
    train.take(7, seed=0).set_field("ground_truth", None).save()
    a = training.train_classifier(train, **FAST, seed=3)
    b = training.train_classifier(train, **FAST, seed=3)
    assert a.num_skipped == 7
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_apply_and_evaluate_write_back(digits_copy):
    train, test = digits_copy.match_tags("train"), digits_copy.match_tags("test")
    clf = train_classifier(train, run_key="vanilla", seed=0, **FAST)
    assert runs.get_run_config(digits_copy, "vanilla")["checkpoint"]
    apply_classifier(test, clf, "pred", run_key="pred_run")
    pred = test.first()["pred"]
    assert pred.label in clf.classes and 0 < pred.confidence <= 1 and len(pred.logits) == 10
    ev = evaluate_classifier(test, "pred", attribute_field="color", aligned_field="bias_aligned", run_key="ev")
    assert 0 <= ev.accuracy <= 1 and ev.num_samples == len(test)
    assert ev.worst_group_accuracy == min(ev.group_accuracy.values())
    assert ev.aligned_accuracy is not None and ev.conflicting_accuracy is not None
    assert runs.load_run_results(digits_copy, "ev")["accuracy"] == ev.accuracy
    # FiftyOne's own evaluation agrees on the written predictions
    fo_eval = test.evaluate_classifications("pred", gt_field="ground_truth")
    assert fo_eval.metrics()["accuracy"] == pytest.approx(ev.accuracy)
    # a saved checkpoint folder predicts the same labels
    apply_classifier(test, runs.get_run_config(digits_copy, "vanilla")["checkpoint"], "pred2")
    assert test.values("pred.label") == test.values("pred2.label")


def test_debiased_weights(digits_copy):
    train = digits_copy.match_tags("train")
    train.match({"bias_aligned": False}).tag_samples("hard")
    up = training.train_classifier(train, hard_tag="hard", upweight=20.0, seed=0, **FAST)
    over = training.train_classifier(train, hard_tag="hard", upweight=20.0, mode="oversample", seed=0, **FAST)
    assert up.config.upweight == 20.0 and over.config.mode == "oversample"
    with pytest.raises(FairBalanceError, match="No sample of the view is tagged"):
        training.train_classifier(train, hard_tag="missing-tag", **FAST)
    train.set_values("w", [1.0] * len(train))
    training.train_classifier(train, weight_field="w", **FAST)
    train.limit(1).set_values("w", [-1.0])
    with pytest.raises(FairBalanceError, match="non-negative"):
        training.train_classifier(train, weight_field="w", **FAST)


def test_mixed_image_sizes_and_modes(make_dataset, tmp_path):
    ds = make_dataset()
    for i in range(8):
        size = (20 + 3 * i, 16 + i)
        img = Image.new("RGB" if i % 2 else "L", size, color=(i * 30, 10, 10) if i % 2 else i * 30)
        img.save(tmp_path / f"{i}.png")
        ds.add_sample(fo.Sample(filepath=str(tmp_path / f"{i}.png"), y=fo.Classification(label=str(i % 2))))
    clf = training.train_classifier(ds, "y", **FAST)
    apply_classifier(ds, clf, "p")
    assert ds.count("p") == 8


def test_resnet18_backbone_runs(digits_copy):
    clf = training.train_classifier(digits_copy.limit(32), backbone="resnet18", pretrained=True, image_size=32,
                                    epochs=1, batch_size=16)
    assert clf.config.backbone == "resnet18"
    logits = training.predict(clf, digits_copy.limit(4).values("filepath"))
    assert logits.shape == (4, 10)
