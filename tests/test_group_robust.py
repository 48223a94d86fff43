"""GroupDRO and DFR on real Colored Digits and the real MongoDB, with real and with discovered groups."""

import collections

import pytest

import fiftyone as fo

import fairbalance as fb
from fairbalance.core import runs
from fairbalance.train import group_robust
from fairbalance.datasets.colored_digits import CLASS_COLORS

COLOR_OF = {str(c): name for c, (name, _) in enumerate(CLASS_COLORS)}


def test_group_dro_records_its_groups_and_their_weights(digits_copy, one_thread):
    train = digits_copy.match_tags("train")
    clf = fb.train_classifier(train, "ground_truth", method="group_dro", group_field="color", epochs=4, batch_size=32,
                              dro_step=0.1, run_key="dro")
    groups = clf.config.groups
    colors = dict(zip(*train.values(["ground_truth.label", "color.label"])))
    assert len(groups) == len({(y, c) for y, c in zip(*train.values(["ground_truth.label", "color.label"]))})
    assert abs(sum(clf.history[-1]["group_weights"]) - 1) < 1e-4 and len(clf.history[-1]["group_weights"]) == len(groups)
    cfg = runs.get_run_config(digits_copy, "dro")
    assert cfg["training_method"] == "group_dro" and cfg["group_field"] == "color" and cfg["dro_step"] == 0.1
    assert cfg["train_config"]["groups"] == groups
    assert colors


def test_group_dro_moves_the_weight_to_the_group_it_cannot_fit(one_thread):
    """Two groups of one class pair: one learnable from the image, one with random labels: q goes to the second."""
    import torch

    from fairbalance.train import group_robust, training

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, 4, 4, generator=gen)
    y = (x[:, 0, 0, 0] > 0.5).long()
    noisy = torch.arange(400) >= 300
    y[noisy] = torch.randint(0, 2, (100,), generator=gen)
    groups = noisy.long().numpy()
    config = training.TrainConfig("y", ["0", "1"], "group_dro", "mlp", image_size=[4, 4], epochs=15, batch_size=50,
                                  lr=1e-2, group_field="g", dro_step=0.2)
    net, _ = training.build_model(config)
    history, _ = group_robust.fit_group_dro(net, config, x, y, torch.ones(400), None, torch.device("cpu"), gen,
                                            False, groups=groups, num_groups=2)
    weights = history[-1]["group_weights"]
    assert weights[1] > 0.6 and history[-1]["worst_group"] == 1  # from 0.5 each


def test_dfr_refits_the_last_layer_on_group_balanced_held_out_samples(digits_copy, one_thread):
    train, held = digits_copy.match_tags("train"), digits_copy.match_tags("test")
    clf = fb.train_classifier(train, "ground_truth", method="dfr", group_field="color", val_samples=held,
                              epochs=3, run_key="dfr")
    counts = collections.Counter(zip(*held.values(["ground_truth.label", "color.label"])))
    last = clf.history[-1]
    assert last["stage"] == "dfr_head" and last["smallest_group"] == min(counts.values())
    assert last["num_groups"] == len(counts) and last["num_samples"] == sum(counts.values())
    assert last["C"] in group_robust.DFR_C_GRID
    assert len(clf.history) == 3 + 1 and clf.config.model_selection.startswith("last_epoch")


def test_dfr_head_undoes_a_shortcut_the_features_carry(one_thread):
    """Inputs = (shortcut, weak core signal, noise); training data 98% aligned, held-out groups balanced: the ERM
    model follows the shortcut on the conflicting group, the refitted head (standardisation folded in) reads the
    core signal."""
    import numpy as np
    import torch

    from fairbalance.train import training

    rng = np.random.default_rng(0)

    def data(n, aligned):
        y = rng.integers(0, 2, n)
        a = np.where(rng.random(n) < aligned, y, 1 - y)
        x = np.stack([4.0 * a + rng.normal(0, 0.3, n), 1.0 * y + rng.normal(0, 0.5, n), rng.normal(0, 1, n)],
                     1)[:, :, None, None]
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), a

    x, y, _ = data(2000, 0.98)
    xh, yh, ah = data(400, 0.5)
    xt, yt, at = data(2000, 0.5)
    conflicting = torch.as_tensor(at != yt.numpy())
    config = training.TrainConfig("y", ["0", "1"], "dfr", "mlp", image_size=[1, 1], epochs=5, batch_size=64,
                                  lr=1e-2, group_field="g")

    def conflicting_accuracy(fit, **kwargs):
        net, _ = training.build_model(config)
        history, _ = fit(net, config, x, y, torch.ones(len(y)), None, torch.device("cpu"),
                         torch.Generator().manual_seed(0), False, **kwargs)
        with torch.no_grad():
            return float((net(xt).argmax(1) == yt)[conflicting].float().mean()), history

    erm, _ = conflicting_accuracy(training._fit_single)
    dfr, history = conflicting_accuracy(group_robust.fit_dfr, held_out=(xh, yh), held_groups=yh.numpy() * 2 + ah)
    assert history[-1]["stage"] == "dfr_head" and erm < 0.5 and dfr > 0.8


def test_dfr_weights_make_every_group_weigh_the_same():
    import numpy as np

    w = group_robust.balanced_weights(np.array(["a", "a", "a", "b", "c", "c"]))
    assert np.isclose(w.mean(), 1) and np.isclose(w[:3].sum(), w[3]) and np.isclose(w[4:].sum(), w[3])


def test_group_dro_on_discovered_slices(digits_copy, one_thread):
    train = digits_copy.match_tags("train")
    fb.discover_slices(train, "ground_truth", epochs=2, slices_per_class=2)
    clf = fb.train_classifier(train, "ground_truth", method="group_dro", group_field="slice", epochs=2,
                              run_key=None)
    assert all(g.split("|")[1].startswith(g.split("|")[0] + "/") for g in clf.config.groups)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "group_dro"}, "needs group_field"),
    ({"method": "vanilla", "group_field": "color"}, "group_field is used by"),
    ({"method": "dfr", "group_field": "color"}, "held-out split"),
    ({"method": "group_dro", "group_field": "color", "dro_step": 0.0}, "dro_step"),
    ({"method": "lff", "refit_head": True}, "refit_head=True retrains the last layer on a held-out split"),
    ({"method": "lff", "refit_head": "yes", "val": True}, "refit_head must be True or False"),
    ({"method": "dfr", "group_field": "color", "refit_head": True, "val": True}, "method='dfr' always does"),
    ({"method": "biased", "refit_head": True, "val": True}, "learns the bias on purpose"),
])
def test_bad_group_settings_fail_before_training(digits_copy, kwargs, message):
    kwargs = dict(kwargs)
    if kwargs.pop("val", False):
        kwargs["val_samples"] = digits_copy.match_tags("test")
    with pytest.raises(fb.FairBalanceError, match=message):
        fb.train_classifier(digits_copy.match_tags("train"), "ground_truth", epochs=1, run_key="bad", **kwargs)
    assert not digits_copy.has_run("bad")  # refused before the run is prepared


def test_samples_without_a_group_and_overlapping_held_out_are_refused(digits_copy):
    train = digits_copy.match_tags("train")
    first = train.first()
    first["color"] = None
    first.save()
    with pytest.raises(fb.FairBalanceError, match="1 of the .* training samples have no 'color'"):
        fb.train_classifier(train, "ground_truth", method="group_dro", group_field="color", epochs=1, run_key=None)
    with pytest.raises(fb.FairBalanceError, match="disjoint"):
        fb.train_classifier(digits_copy.match_tags("test"), "ground_truth", method="dfr", group_field="color",
                            val_samples=digits_copy.match_tags("test"), epochs=1, run_key=None)
    held_without_a_class = digits_copy.match_tags("test").match(fo.ViewField("ground_truth.label") != "3")
    with pytest.raises(fb.FairBalanceError, match=r"no sample of class\(es\) \['3'\]"):
        fb.train_classifier(train, "ground_truth", method="dfr", group_field="color", val_samples=held_without_a_class,
                            epochs=1, run_key=None)
    assert fo.dataset_exists(digits_copy.name)


@pytest.fixture(scope="module")
def colored_mnist_1pct(tmp_path_factory):
    """Real Colored MNIST (LfF protocol, 1% bias-conflicting): colour is the planted shortcut of every class."""
    ds = fb.colored_mnist("fb-test-refit-head", conflict_ratio=0.01, num_val=200, num_test=500,
                          output_dir=str(tmp_path_factory.mktemp("cmnist")), overwrite=True)
    yield ds
    ds.delete()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_refit_head_after_lff_undoes_the_colour_shortcut(colored_mnist_1pct, one_thread):
    """LfF trained briefly still follows the colour; the same training with ``refit_head=True`` (DFR's last layer
    on the 200 unbiased validation digits, classes alone) reads the digit on the unbiased test split."""
    ds = colored_mnist_1pct
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")

    def conflicting_accuracy(clf):
        fb.apply_classifier(test, clf, "refit_pred", store_logits=False, overwrite=True)
        return fb.evaluate_classifier(test, "refit_pred", aligned_field="bias_aligned").conflicting_accuracy

    as_trained = fb.train_classifier(train, method="lff", epochs=3, run_key=None)
    refit = fb.train_classifier(train, method="lff", epochs=3, val_samples=val, refit_head=True, run_key="lff_refit")
    before, after = conflicting_accuracy(as_trained), conflicting_accuracy(refit)
    assert before < 0.45 and after > before + 0.2, (before, after)
    last = refit.history[-1]
    assert last["stage"] == "dfr_head" and last["num_groups"] == 10 and last["num_samples"] == len(val)
    assert refit.config.model_selection.startswith("last_epoch") and refit.best_epoch == 3 + 1
    cfg = runs.get_run_config(ds, "lff_refit")
    assert cfg["training_method"] == "lff" and cfg["refit_head"] is True and cfg["train_config"]["refit_head"]
    assert "group_field" not in cfg
    # with a group field, the held-out samples are balanced over (class, group) pairs; rerun needs overwrite
    grouped = fb.train_classifier(train, method="lff", epochs=1, val_samples=val, refit_head=True,
                                  group_field="color", run_key="lff_refit", overwrite=True)
    pairs = set(zip(*val.values(["ground_truth.label", "color.label"])))
    assert grouped.history[-1]["num_groups"] == len(pairs) == len(grouped.config.groups) > 10
    assert runs.get_run_config(ds, "lff_refit")["group_field"] == "color"



def test_train_classifier_operator_refits_the_head_on_the_validation_tag(digits_copy, one_thread):
    import fiftyone.operators as foo

    res = foo.execute_operator("@fairbalance/fairbalance/train_classifier", ctx={
        "dataset": digits_copy.name, "view": digits_copy.match_tags("train"),
        "params": {"label_field": "ground_truth", "method": "lff", "epochs": 2, "val_tag": "test", "refit_head": True,
                   "run_key": "op_refit", "view_target": "CURRENT_VIEW"}})
    assert res.error is None, res.error
    assert res.result["model_selection"].endswith("refitted on the validation samples")
    cfg = runs.get_run_config(digits_copy, "op_refit")
    assert cfg["training_method"] == "lff" and cfg["refit_head"] is True
    assert runs.load_run_results(digits_copy, "op_refit")["history"][-1]["stage"] == "dfr_head"
