import fiftyone as fo
import numpy as np
import pytest
import torch
from PIL import Image

from fairbalance.core import models as fb_models
from fairbalance.core import runs
from fairbalance.train import training
from fairbalance.train.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.tag.hardness import compute_hardness, hardest, loss_ranks
from fairbalance.core.validation import FairBalanceError

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
    assert clf.config.method == "biased" and clf.classes == [str(c) for c in range(10)]
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
    a = training.train_classifier(train, training.TrainConfig(**FAST, seed=3))
    b = training.train_classifier(train, training.TrainConfig(**FAST, seed=3))
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
    labels = test.values("ground_truth.label")
    with pytest.raises(FairBalanceError, match="would replace the labels"):
        apply_classifier(test, clf, "ground_truth")
    assert test.values("ground_truth.label") == labels  # untouched
    # a saved checkpoint folder predicts the same labels
    apply_classifier(test, runs.get_run_config(digits_copy, "vanilla")["checkpoint"], "pred2")
    assert test.values("pred.label") == test.values("pred2.label")


def test_jtt_weights_reach_the_loss(digits_copy):
    train = digits_copy.match_tags("train")
    conflicting = train.match({"bias_aligned": False})
    conflicting.tag_samples("hard")
    plain = training.train_classifier(train, training.TrainConfig(seed=0, **FAST))
    up = training.train_classifier(train, training.TrainConfig(method="jtt", hard_tag="hard", upweight=20.0, seed=0,
                                                                **FAST))
    assert up.config.upweight == 20.0 and up.config.method == "jtt"
    # same seed and data: only the weights differ, and they change what is learned
    assert not all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                        up.model.state_dict().values()))
    # upweighting the conflicting samples lowers their loss relative to vanilla training
    paths = conflicting.values("filepath")
    labels = torch.tensor([int(v) for v in conflicting.values("ground_truth.label")])
    loss = lambda clf: torch.nn.functional.cross_entropy(training.predict(clf, paths), labels)  # noqa: E731
    assert loss(up) < loss(plain)
    with pytest.raises(FairBalanceError, match="No labelled sample of the view is tagged"):
        training.train_classifier(train, training.TrainConfig(method="jtt", hard_tag="missing-tag", **FAST))
    with pytest.raises(FairBalanceError, match="needs hard_tag"):
        training.train_classifier(train, training.TrainConfig(method="jtt", **FAST))
    with pytest.raises(FairBalanceError, match="jtt' only"):
        training.train_classifier(train, training.TrainConfig(hard_tag="hard", **FAST))
    train.set_values("w", [1.0] * len(train))
    training.train_classifier(train, training.TrainConfig(weight_field="w", **FAST))
    train.limit(1).set_values("w", [-1.0])
    with pytest.raises(FairBalanceError, match="non-negative"):
        training.train_classifier(train, training.TrainConfig(weight_field="w", **FAST))


def test_lff_relative_difficulty_weights():
    y = torch.tensor([0, 0, 1, 1])
    weights = training._LfFWeights(y, 2, alpha=0.5)
    w = weights(torch.arange(4), torch.tensor([1.0, 0.1, 2.0, 2.0]), torch.tensor([1.0, 0.1, 0.5, 2.0]))
    # first visit: the losses themselves, divided by their class maximum, then CE_b / (CE_b + CE_d)
    expected = torch.tensor([1.0 / 2, 0.1 / 0.2, 1.0 / (1.0 + 0.25), 0.5])
    assert torch.allclose(w, expected, atol=1e-6)
    w2 = weights(torch.tensor([0]), torch.tensor([3.0]), torch.tensor([1.0]))  # EMA: 0.5*1 + 0.5*3 = 2 vs 1
    assert torch.allclose(w2, torch.tensor([(2.0 / 2.0) / (2.0 / 2.0 + 1.0 / 1.0)]))


def test_lff_trains_and_records(digits_copy):
    train, test = digits_copy.match_tags("train"), digits_copy.match_tags("test")
    clf = train_classifier(train, method="lff", run_key="lff", seed=0, val_samples=test, **FAST)
    assert clf.config.method == "lff" and all("mean_lff_weight" in h for h in clf.history)
    assert all(0 < h["mean_lff_weight"] < 1 for h in clf.history)
    res = runs.load_run_results(digits_copy, "lff")
    assert res["model_selection"] == "best_val_accuracy"
    best = max(clf.history, key=lambda h: h["val_accuracy"])
    assert res["best_epoch"] == best["epoch"]
    apply_classifier(test, clf, "pred")
    ev = evaluate_classifier(test, "pred")
    assert ev.accuracy == pytest.approx(best["val_accuracy"])  # the kept model is the best epoch's


def test_synthetic_uses_generated_samples_that_carry_the_label(digits_copy):
    train = digits_copy.match_tags("train")
    fake = [fo.Sample(filepath=s.filepath, tags=["train", "generated"], generated=True,
                      ground_truth=fo.Classification(label=s.ground_truth.label)) for s in train.limit(40)]
    fake += [fo.Sample(filepath=s.filepath, tags=["train", "generated"], generated=True) for s in train.limit(5)]
    digits_copy.add_samples(fake)
    view = digits_copy.match_tags("train")
    vanilla = training.train_classifier(view, training.TrainConfig(seed=0, **FAST))
    assert vanilla.num_generated_excluded == 40 and vanilla.num_generated_used == 0
    synth = training.train_classifier(view, training.TrainConfig(method="synthetic", seed=0, **FAST))
    assert synth.num_generated_used == 40 and synth.num_skipped == 5  # unlabelled ones are skipped, counted
    capped = training.train_classifier(view, training.TrainConfig(method="synthetic", max_synthetic_fraction=0.05,
                                                                  seed=0, **FAST))
    cap = int(0.05 * len(view.match({"generated": {"$ne": True}})))  # 5% of the 300 real samples
    assert capped.num_generated_used == cap == 15 and capped.num_generated_excluded == 40 - cap
    with pytest.raises(FairBalanceError, match="needs generated samples"):
        training.train_classifier(train.match({"generated": {"$ne": True}}),
                                  training.TrainConfig(method="synthetic", **FAST))


def test_lff_and_jtt_train_on_generated_samples_when_asked(digits_copy):
    """use_generated=True: LfF and JTT take the generated samples that carry the label, as synthetic does; LfF's
    weights cover them; every other method refuses the option before any run is prepared."""
    train = digits_copy.match_tags("train")
    fake = [fo.Sample(filepath=s.filepath, tags=["train", "generated"], generated=True,
                      ground_truth=fo.Classification(label=s.ground_truth.label)) for s in train.limit(40)]
    digits_copy.add_samples(fake)
    view = digits_copy.match_tags("train")
    plain = train_classifier(view, method="lff", seed=0, run_key=None, **FAST)
    assert plain.num_generated_used == 0 and plain.num_generated_excluded == 40
    lff = train_classifier(view, method="lff", use_generated=True, seed=0, run_key="lff_gen", **FAST)
    assert lff.num_generated_used == 40 and lff.num_generated_excluded == 0
    assert all(0 < h["mean_lff_weight"] < 1 for h in lff.history)
    assert runs.get_run_config(digits_copy, "lff_gen")["use_generated"] is True
    hard = view.match({"generated": {"$ne": True}}).limit(10)
    hard.tag_samples("hard")
    jtt = train_classifier(view, method="jtt", hard_tag="hard", use_generated=True, seed=0, run_key=None, **FAST)
    assert jtt.num_generated_used == 40
    for kwargs, message in ((dict(method="vanilla"), "use_generated is for method 'lff' or 'jtt'"),
                            (dict(method="synthetic"), "always train on generated samples"),
                            (dict(method="lff", use_generated="yes"), "use_generated must be True or False")):
        with pytest.raises(FairBalanceError, match=message):
            train_classifier(view, **{"use_generated": True, **kwargs}, run_key="refused", **FAST)
        assert not digits_copy.has_run("refused")
    with pytest.raises(FairBalanceError, match="with use_generated=True needs generated samples"):
        train_classifier(train.match({"generated": {"$ne": True}}), method="lff", use_generated=True, run_key=None,
                         **FAST)


def test_input_handling_and_bad_input(digits_copy, tmp_path, monkeypatch):
    train = digits_copy.match_tags("train")
    clf = training.train_classifier(train, training.TrainConfig(backbone="auto", epochs=1, normalize="dataset"))
    assert clf.config.image_size == [32, 32] and clf.config.backbone == "mlp"  # native size, LfF's MLP
    assert clf.config.mean is not None and len(clf.config.std) == 3
    folder = clf.save(str(tmp_path / "clf"))
    paths = train.limit(5).values("filepath")
    assert torch.allclose(training.predict(clf, paths), training.predict(training.load_classifier(folder), paths))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    with pytest.raises(fb_models.ModelNotFoundError, match="pretrained=True"):
        training.train_classifier(train, training.TrainConfig(backbone="resnet18", pretrained=True, epochs=1))
    for bad, match in (({"method": "magic"}, "method must be"), ({"normalize": "z"}, "normalize must be"),
                       ({"lr": float("nan")}, "lr must be"), ({"ema": 1.0}, "ema must be")):
        with pytest.raises(FairBalanceError, match=match):
            training.train_classifier(train, training.TrainConfig(**{**FAST, **bad}))
    (tmp_path / "clf" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(fb_models.ModelNotFoundError, match="corrupt"):
        training.load_classifier(folder)


def test_top_k_counts_fractions_and_error_set(digits_copy):
    from fairbalance.tag.hardness import resolve_top_k

    assert resolve_top_k(None, 300) is None
    assert resolve_top_k(1.0, 300) == 300 and resolve_top_k(0.01, 300) == 3 and resolve_top_k(1, 300) == 1
    for bad in (0, -1, 0.0, 1.5, float("nan"), True, 301):
        with pytest.raises(FairBalanceError):
            resolve_top_k(bad, 300)
    train = digits_copy.match_tags("train")
    result = compute_hardness(train, epochs=3, **{k: v for k, v in FAST.items() if k != "epochs"})
    clf = training.load_classifier(result.checkpoint)
    wrong = training.predict(clf, train.values("filepath")).argmax(1).numpy() != np.array(
        [int(v) for v in train.values("ground_truth.label")])
    tagged = set(digits_copy.match_tags("bias_conflicting").values("id"))
    assert tagged == {i for i, w in zip(train.values("id"), wrong) if w}  # the biased model's error set
    assert runs.get_run_config(digits_copy, "hardness")["selection"] == "error_set"


def test_mixed_image_sizes_and_modes(make_dataset, tmp_path):
    ds = make_dataset()
    for i in range(8):
        size = (20 + 3 * i, 16 + i)
        img = Image.new("RGB" if i % 2 else "L", size, color=(i * 30, 10, 10) if i % 2 else i * 30)
        img.save(tmp_path / f"{i}.png")
        ds.add_sample(fo.Sample(filepath=str(tmp_path / f"{i}.png"), y=fo.Classification(label=str(i % 2))))
    with pytest.raises(FairBalanceError, match="8 different sizes"):
        training.train_classifier(ds, training.TrainConfig("y", **{k: v for k, v in FAST.items() if k != "image_size"}))
    clf = training.train_classifier(ds, training.TrainConfig("y", **FAST))
    apply_classifier(ds, clf, "p")
    assert ds.count("p") == 8


def test_resnet18_backbone_runs(digits_copy):
    clf = training.train_classifier(digits_copy.limit(32), training.TrainConfig(backbone="resnet18", image_size=32,
                                                                                epochs=1, batch_size=16))
    assert clf.config.backbone == "resnet18" and clf.config.pretrained_weights is None
    logits = training.predict(clf, digits_copy.limit(4).values("filepath"))
    assert logits.shape == (4, 10)


def test_unusable_output_folder_is_refused_before_training(digits_copy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    train = digits_copy.match_tags("train")
    for fn in (compute_hardness, train_classifier):
        with pytest.raises(FairBalanceError, match="Cannot create output folder"):
            fn(train, output_dir=str(blocker / "sub"), **{**FAST, "epochs": 10_000})  # would take long if it trained
    assert not digits_copy.has_field("bias_loss") and not digits_copy.has_run("hardness")
    assert not digits_copy.has_run("classifier")
