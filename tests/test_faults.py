"""The second fault sweep (issue #24), items 1-4, 6, 8-10: each case on a real dataset, real files, real models.

Each test reproduces what the sweep found (data deleted, a folder shared by two runs or datasets, a tag
taken off a user's samples, a record that lies, a path outside its root, a pickle run from a user's folder)
and checks the one writer contract that now holds (python_lib/fairbalance/core/folders.py).
"""

import os

import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

from fairbalance.core import runs
from fairbalance.core.validation import FairBalanceError

FAST = dict(backbone="mlp", image_size=8, epochs=1, batch_size=64)
TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)
GEN = dict(label_field="ground_truth", per_class=3, num_inference_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def digits():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-faults-digits", num_classes=3, train_per_class=10, test_per_class=2,
                                 image_size=16, persistent=False, overwrite=True)
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def model(digits, tmp_path_factory, one_thread):
    from fairbalance import train_conditional_diffusion

    folder = str(tmp_path_factory.mktemp("faults") / "model")
    return train_conditional_diffusion(digits.match_tags("train"), "ground_truth", output_dir=folder, epochs=1,
                                       run_key="faults_model", **TINY)


@pytest.fixture
def clones(digits):
    made = [digits.clone(), digits.clone()]
    yield made
    for ds in made:
        ds.delete()


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".png")}


@pytest.fixture
def small(make_dataset, tmp_path):
    """30 real PNGs in their own media folder, labels 0/1/2, split tags train (24) / test (6)."""
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    ds = make_dataset()
    samples = []
    for i in range(30):
        path = str(media / f"img{i:02d}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        samples.append(fo.Sample(filepath=path, tags=["train" if i < 24 else "test"],
                                 ground_truth=fo.Classification(label=str(i % 3)),
                                 color=fo.Classification(label="red" if i % 2 else "green")))
    ds.add_samples(samples)
    return ds


# 1. export's overwrite deleted any non-empty folder before checking there was anything to export

def test_1_export_overwrite_never_deletes_a_folder_it_did_not_write(small, tmp_path):
    from fairbalance import export_samples

    media = os.path.dirname(small.first().filepath)
    with pytest.raises(FairBalanceError, match="did not write"):
        export_samples(small, media, overwrite=True)
    assert len(os.listdir(media)) == 30  # the dataset's own images, all still there
    thesis = tmp_path / "work"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(FairBalanceError, match="No sample left"):
        export_samples(small, str(thesis), exclude_tags=["train", "test"], overwrite=True)
    with pytest.raises(FairBalanceError, match="did not write"):
        export_samples(small, str(thesis), overwrite=True)
    assert os.listdir(thesis) == ["thesis.tex"]
    # an export folder: overwrite replaces the export, and only it (a file the user put there stays)
    out = tmp_path / "out"
    first = export_samples(small, str(out))
    assert first.num_samples == 30
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FairBalanceError, match="overwrite=True"):
        export_samples(small, str(out))
    second = export_samples(small.match_tags("test"), str(out), overwrite=True)
    assert second.num_samples == 6 and (out / "notes.txt").read_text() == "mine"
    assert sum(len(files) for _, _, files in os.walk(out / "0")) == 2  # the old export's images went
    # another dataset's export folder is refused, overwrite included
    other = fo.Dataset()
    try:
        other.add_samples([small.first().copy()])
        with pytest.raises(FairBalanceError, match="belongs to"):
            export_samples(other, str(out), overwrite=True)
    finally:
        other.delete()
    assert len(small) == 30 and all(os.path.isfile(p) for p in small.values("filepath"))


# 2. compute_hardness_tags took its tag off every ranked sample it did not tag, on its first run

def test_2_hardness_removes_only_the_tags_it_put(small, one_thread):
    from fairbalance import compute_hardness_tags

    conflicting = small.match_tags("test").limit(3)
    conflicting.tag_samples("bias_conflicting")
    mine = set(conflicting.values("id"))
    result = compute_hardness_tags(small, tag="train", top_k=4, per_class=False, run_key="h_train", **FAST)
    assert len(small.match_tags("train")) >= 24  # the user's split is whole (the 4 hardest have it too)
    added = set(runs.load_run_results(small, "h_train")["tagged_ids"])
    assert result.num_tagged == 4 and len(small.match_tags("train")) == 24 + len(added)
    runs.delete_run(small, "h_train")
    assert len(small.match_tags("train")) == 24 and set(small.match_tags("test").values("id")).isdisjoint(
        small.match_tags("train").values("id"))
    compute_hardness_tags(small, top_k=5, per_class=False, run_key="h_bc", **FAST)
    assert mine <= set(small.match_tags("bias_conflicting").values("id"))
    compute_hardness_tags(small, top_k=1, per_class=False, run_key="h_bc", overwrite=True, **FAST)
    assert mine <= set(small.match_tags("bias_conflicting").values("id"))
    assert len(small.match_tags("bias_conflicting")) <= 4
    runs.delete_run(small, "h_bc")
    assert set(small.match_tags("bias_conflicting").values("id")) == mine


# 3. a second run key trained into another run's classifier folder and replaced its model

def test_3_a_model_folder_belongs_to_one_run(small, tmp_path, one_thread):
    from fairbalance import apply_classifier, compute_hardness_tags, train_classifier

    folder = str(tmp_path / "clf")
    train_classifier(small, run_key="ca", output_dir=folder, **FAST)
    model = open(os.path.join(folder, "model.pt"), "rb").read()
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(FairBalanceError, match="belongs to run 'ca'"):
            train_classifier(small, run_key="cb", output_dir=folder, **{**FAST, "backbone": "cnn"}, **kwargs)
        with pytest.raises(FairBalanceError, match="belongs to run 'ca'"):
            compute_hardness_tags(small, run_key="hb", output_dir=folder, **FAST, **kwargs)
    assert open(os.path.join(folder, "model.pt"), "rb").read() == model
    assert not small.has_run("cb") and not small.has_run("hb")
    apply_classifier(small, None, "pred", classifier_run="ca", run_key="pa")
    assert runs.get_run_config(small, "ca")["train_config"]["backbone"] == "mlp"
    # the run itself may replace its model (and only its own files: a user's file there stays)
    open(os.path.join(folder, "notes.txt"), "w").write("mine")
    train_classifier(small, run_key="ca", output_dir=folder, overwrite=True, **{**FAST, "seed": 1})
    assert open(os.path.join(folder, "notes.txt")).read() == "mine"
    assert open(os.path.join(folder, "model.pt"), "rb").read() != model


# 4. two datasets shared generated files, and one's overwrite deleted and re-rendered the other's

def test_4_a_generation_folder_belongs_to_one_dataset(clones, model, tmp_path):
    from fairbalance import generate_balanced

    a, b = clones
    folder = str(tmp_path / "gen")
    generate_balanced(a, model=model, output_dir=folder, run_key="g", **GEN)
    before = _files(folder)
    assert len(before) == 9 and len(a.match_tags("generated")) == 9
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(FairBalanceError, match=f"belongs to run 'g' of dataset '{a.name}'"):
            generate_balanced(b, model=model, output_dir=folder, run_key="g", **GEN, **kwargs)
    assert len(b.match_tags("generated")) == 0 and _files(folder) == before
    # a generated into b's dataset (target_dataset=) gets a folder of its own, not a's
    res = generate_balanced(a, model=model, target_dataset=b, run_key="g", **GEN)
    assert res.output_dir != folder and len(b.match_tags("generated")) == 9
    # a's own overwrite with other settings replaces only a's images (a user's file there stays)
    open(os.path.join(folder, "notes.txt"), "w").write("mine")
    generate_balanced(a, model=model, output_dir=folder, run_key="g", overwrite=True, **{**GEN, "seed": 5})
    assert len(a.match_tags("generated")) == 9 and set(_files(folder)).isdisjoint(before)
    assert open(os.path.join(folder, "notes.txt")).read() == "mine"
    assert all(os.path.isfile(p) for p in b.match_tags("generated").values("filepath"))


# 6. overwrite=True on a sub-view left the old run's values on the other samples

def test_6_overwrite_on_a_view_clears_the_old_values_everywhere(small, tmp_path, one_thread):
    from fairbalance import apply_classifier, compute_pseudo_labels, train_classifier

    a = train_classifier(small, run_key="ca", output_dir=str(tmp_path / "a"), **FAST)
    b = train_classifier(small, run_key="cb", output_dir=str(tmp_path / "b"), **{**FAST, "seed": 1})
    apply_classifier(small, a, "pred")
    assert small.count("pred") == 30
    test = small.match_tags("test")
    apply_classifier(test, b, "pred", overwrite=True)
    assert small.count("pred") == 6 and set(small.exists("pred").values("id")) == set(test.values("id"))
    assert runs.get_run_config(small, "pred")["classifier_run"] == "cb"
    rng = np.random.default_rng(0)
    small.set_values("feat", [rng.normal(size=4) for _ in range(30)])
    compute_pseudo_labels(small, features_field="feat", label_field="pl", method="kmeans", num_clusters=2)
    compute_pseudo_labels(test, features_field="feat", label_field="pl", method="kmeans", num_clusters=2,
                          overwrite=True)
    assert set(small.exists("pl").values("id")) == set(test.values("id"))


# 8. records that lied: a finished step rerun rewrote its record; a resumed run said it was not resumed

def test_8_records_describe_the_work_done(digits, clones, model, tmp_path):
    from fairbalance import generate_balanced, train_conditional_diffusion

    a = clones[0]
    folder = str(tmp_path / "gen")
    generate_balanced(a, model=model, output_dir=folder, run_key="g", **GEN)
    record = runs.get_run_config(a, "g")["completed_at"]
    again = generate_balanced(a, model=model, output_dir=folder, run_key="g", **GEN)  # finished: nothing to do
    assert again.resumed and again.num_added == 0
    assert runs.get_run_config(a, "g")["completed_at"] == record and runs.load_run_results(a, "g")["num_added"] == 9
    # a call killed after adding 6 of its 9 samples (before its record): the rerun resumes and counts the total
    gen = a.match_tags("generated")
    last = gen.skip(6)
    for p in last.values("filepath"):
        os.remove(p)
    a.delete_samples(last)
    a.delete_run("g")
    resumed = generate_balanced(a, model=model, output_dir=folder, run_key="g", **GEN)
    results = runs.load_run_results(a, "g")
    assert resumed.resumed and results["resumed"] and resumed.num_added == 3 == results["num_added_now"]
    assert results["num_added"] == 9 == len(a.match_tags("generated")) and sum(results["added"].values()) == 9
    # diffusion training rerun when finished: the record (final loss) stays as the training made it
    ds = digits
    before = runs.load_run_results(ds, "faults_model")
    stamp = runs.get_run_config(ds, "faults_model")["completed_at"]
    rerun = train_conditional_diffusion(ds.match_tags("train"), "ground_truth", output_dir=model.model_dir, epochs=1,
                                        run_key="faults_model", **TINY)
    assert rerun.final_loss == before["final_loss"] is not None and rerun.steps == before["steps"]
    assert runs.get_run_config(ds, "faults_model")["completed_at"] == stamp
    assert runs.load_run_results(ds, "faults_model")["final_loss"] == before["final_loss"]


# 9. default folders built from dataset names like ../../x wrote outside the data folder

def test_9_folders_from_names_stay_under_the_data_folder(small, clones, model, tmp_path, one_thread):
    from fairbalance import generate_balanced, train_classifier
    from fairbalance.core import config

    root = os.path.realpath(config.data_dir())
    evil = "../" * 30 + str(tmp_path).lstrip("/") + "/escaped"  # the old code wrote to tmp_path/escaped/...
    named = fo.Dataset(evil)
    try:
        named.add_samples([s.copy() for s in small])
        clf = train_classifier(named, run_key="c", **FAST)
        assert os.path.realpath(clf.checkpoint).startswith(root + os.sep)
        res = generate_balanced(clones[0], model=model, target_dataset=named, run_key="g", **GEN)
        assert os.path.realpath(res.output_dir).startswith(root + os.sep)
        assert len(named.match_tags("generated")) == 9
    finally:
        named.delete()
    assert not os.path.exists(tmp_path / "escaped")
    from fairbalance.core.folders import default_folder

    assert default_folder("generated", evil, "g").startswith(root + os.sep)
    assert default_folder("generated", "a/b", "g") != default_folder("generated", "a_b", "g")


# 10. a pickle planted in a checkpoint ran on resume; a class named in MongoDB was imported; any App path read

def test_10_no_code_from_user_writable_places(digits, tmp_path, one_thread):
    import torch

    from fairbalance import train_conditional_diffusion
    from fairbalance.generate import generation

    folder = str(tmp_path / "model")
    train = digits.match_tags("train")
    train_conditional_diffusion(train, "ground_truth", output_dir=folder, epochs=1, run_key="d10",
                                checkpoint_every=1, **TINY)
    state = os.path.join(folder, "training_state")
    (ckpt,) = [n for n in os.listdir(state) if n.startswith("step-")]
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"shadow_params": Planted()}, os.path.join(state, ckpt, "ema.pt"))
    with pytest.raises(FairBalanceError, match="checkpoint"):
        train_conditional_diffusion(train, "ground_truth", output_dir=folder, epochs=2, run_key="d10",
                                    checkpoint_every=1, **TINY)
    assert not marker.exists()
    # merge_shards imports only the known result classes, whatever the job document says
    job = {"run_key": "g", "shards": {}, "shared": {"plan": {
        "result_class": "os:system", "planned": [], "counts_before": None, "output_dir": "", "target_dataset": "",
        "extra": {}}}}
    with pytest.raises(FairBalanceError, match="unknown result class"):
        generation.merge_shards(digits, job)
    # the run_pipeline operator reads only pipeline files under the allowed roots
    from fairbalance.core.folders import pipeline_file

    outside = tmp_path / "p.yml"
    outside.write_text("dataset: x\nsteps: []\n")
    for path in (str(outside), "../../../etc/passwd", "../" + str(outside)):
        with pytest.raises(FairBalanceError, match="not a pipeline file the App may run"):
            pipeline_file(path)
    os.environ["FAIRBALANCE_PIPELINE_DIRS"] = str(tmp_path)
    try:
        assert pipeline_file(str(outside)) == os.path.realpath(outside)
    finally:
        del os.environ["FAIRBALANCE_PIPELINE_DIRS"]


def test_2_filter_removes_only_the_tags_it_put(clones, model, tmp_path):
    """The same rule for filter_generated's tag: a reviewer's own low_quality tags survive the run's deletion."""
    from fairbalance import filter_generated, generate_balanced

    a = clones[0]
    generate_balanced(a, model=model, output_dir=str(tmp_path / "gen"), run_key="g", **GEN)
    reviewed = a.match_tags("generated").limit(9)
    reviewed.tag_samples("low_quality")  # a person marked every generated image by hand
    filter_generated(a, label_field="ground_truth", method="pixels", bottom_fraction=0.5, run_key="f")
    runs.delete_run(a, "f")
    assert len(a.match_tags("low_quality")) == 9
