"""One folder rule (issue #23): claim_output_folder + claim_setting for every writer's folder, one split-folder
rule for the dataset builders, one writable-folder check for output, data and cache folders."""

from __future__ import annotations

import json
import os

import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

from fairbalance.core import config, folders
from fairbalance.core.validation import FairBalanceError
from fairbalance.generate import engine


def _png(path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    return path


def test_a_folder_holds_one_setting_and_overwrite_deletes_only_what_its_run_listed(make_dataset, tmp_path):
    ds = make_dataset()
    folder = folders.claim_output_folder(str(tmp_path / "out"), ds, "run")
    _png(os.path.join(folder, "mine.png"))
    folders.record(folder, ["mine.png"])
    assert folders.claim_setting(folder, None, {"model": "a"}, False) is False  # nothing of a setting there yet
    assert folders.claim_setting(folder, {"model": "a"}, {"model": "a"}, False) is False  # the same: kept
    with pytest.raises(FairBalanceError, match="already holds adapters of another configuration"):
        folders.claim_setting(folder, {"model": "a"}, {"model": "b"}, False, kind="adapters")
    with pytest.raises(FairBalanceError, match="already holds 1 images of an unknown run"):
        folders.claim_setting(folder, None, {"model": "b"}, False, unknown=1, kind="images")
    assert os.path.isfile(os.path.join(folder, "mine.png"))  # refused: nothing deleted
    _png(os.path.join(folder, "user.png"))  # put there by hand, never listed
    forgotten = []
    assert folders.claim_setting(folder, {"model": "a"}, {"model": "b"}, True, forget=lambda: forgotten.append(1))
    assert forgotten == [1] and sorted(os.listdir(folder)) == [folders.OWNER_FILE, "user.png"]


def test_generation_folder_refuses_another_setting_and_shards_share_it(make_dataset, tmp_path):
    ds = make_dataset()
    ds.add_sample(fo.Sample(filepath=_png(str(tmp_path / "real.png"))))
    out = str(tmp_path / "gen")

    def start(setting, overwrite=False):
        return engine.start_generation(ds, None, out, "gen", "generate_balanced", {"per_class": 1}, setting, overwrite)

    _, folder, _ = start({"model": "m1"})
    image = _png(os.path.join(folder, "cluster0_seed1_0.png"))  # an image of this setting, listed and added
    folders.record(folder, [os.path.basename(image)])
    ds.add_sample(fo.Sample(filepath=image, generated=True))
    start({"model": "m1"})  # the same setting (a rerun, another shard of the job): the image stays
    assert os.path.isfile(image)
    with pytest.raises(FairBalanceError, match="already holds images of another configuration"):
        start({"model": "m2"})
    assert os.path.isfile(image) and len(ds) == 2
    start({"model": "m2"}, overwrite=True)  # the old setting's image and its sample go
    assert not os.path.exists(image) and len(ds) == 1
    with open(os.path.join(folder, engine.GENERATION_FILE)) as f:
        assert json.load(f) == {"model": "m2"}


def test_an_export_folder_is_replaced_only_with_overwrite(make_dataset, tmp_path):
    ds = make_dataset()
    folder = folders.claim_output_folder(str(tmp_path / "export"), ds, "export", reuse=False)
    _png(os.path.join(folder, "a.png"))
    folders.record(folder, ["a.png"])
    with pytest.raises(FairBalanceError, match="is not empty; pass overwrite=True"):
        folders.claim_output_folder(folder, ds, "export", reuse=False)
    assert os.path.isfile(os.path.join(folder, "a.png"))
    folders.claim_output_folder(folder, ds, "export", reuse=True)  # other writers reuse their own folder
    folders.claim_output_folder(folder, ds, "export", overwrite=True, reuse=False)
    assert not os.path.exists(os.path.join(folder, "a.png"))


def test_split_folders_of_the_dataset_builders(tmp_path):
    out = str(tmp_path / "data")
    os.makedirs(os.path.join(out, "train"))
    with pytest.raises(FairBalanceError, match="train/ or test/ folders not written by colored_digits"):
        folders.prepare_split_folders(out, "ds", "colored_digits")
    os.rmdir(os.path.join(out, "train"))
    folders.prepare_split_folders(out, "ds", "colored_mnist", ("train", "val", "test"))
    _png(os.path.join(out, "val", "old.png"))
    folders.prepare_split_folders(out, "ds", "colored_mnist", ("train", "val", "test"))  # a rebuild empties them
    assert os.listdir(os.path.join(out, "val")) == [] and os.path.isfile(os.path.join(out, ".colored_mnist"))
    with pytest.raises(FairBalanceError, match="not written by corrupted_mnist"):
        folders.prepare_split_folders(out, "ds", "corrupted_mnist", ("train", "val", "test"))


def test_data_and_cache_folders_follow_the_writable_folder_rule(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FAIRBALANCE_DATA_DIR", str(blocker))
    with pytest.raises(FairBalanceError, match="is a file, not a folder; set FAIRBALANCE_DATA_DIR"):
        config.data_dir()
    monkeypatch.setenv("FAIRBALANCE_CACHE_DIR", str(blocker / "sub"))
    with pytest.raises(FairBalanceError, match="Cannot create .*; set FAIRBALANCE_CACHE_DIR to a writable folder"):
        config.cache_dir()
    monkeypatch.setenv("FAIRBALANCE_CACHE_DIR", str(tmp_path / "cache"))
    assert config.cache_dir() == str(tmp_path / "cache") and os.path.isdir(tmp_path / "cache")


def _hold_in_another_operation(claim):
    """Run ``claim()`` inside its own operation (a thread: its own claims scope) and hold it until released."""
    import threading

    from fairbalance.core import claims

    held, release, errors = threading.Event(), threading.Event(), []

    @claims.exclusive
    def operation():
        try:
            claim()
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
        held.set()
        release.wait(60)

    thread = threading.Thread(target=operation)
    thread.start()
    assert held.wait(30) and not errors, errors
    return release, thread


def test_a_rebuild_waits_for_operations_on_the_dataset_and_writers_wait_for_a_rebuild(tmp_path):
    """overwrite=True must not delete a dataset (or its folder) under a running operation, nor start one mid-rebuild."""
    from fairbalance.core import claims
    from fairbalance.datasets.colored_digits import colored_digits
    from fairbalance.find.balance import balance_report

    kw = dict(output_dir=str(tmp_path / "digits"), num_classes=3, train_per_class=4, test_per_class=2,
              conflict_ratio=0.25, image_size=8, persistent=False, overwrite=True)
    ds = colored_digits("fb-rebuild-claims", **kw)
    ids, files = set(ds.values("id")), sorted(os.listdir(tmp_path / "digits" / "train"))
    release, thread = _hold_in_another_operation(lambda: claims.claim_field(ds, "bias_loss"))  # e.g. hardness
    try:
        with pytest.raises(claims.ClaimError, match="in use by a running operation"):
            colored_digits("fb-rebuild-claims", **kw)
        assert set(fo.load_dataset("fb-rebuild-claims").values("id")) == ids  # not deleted, not rebuilt
        assert sorted(os.listdir(tmp_path / "digits" / "train")) == files
        with pytest.raises(FairBalanceError, match="holds the images of dataset 'fb-rebuild-claims'"):
            colored_digits("fb-rebuild-claims-2", **kw)  # another name, the same folder: never its images
        assert sorted(os.listdir(tmp_path / "digits" / "train")) == files
    finally:
        release.set()
        thread.join()
    release, thread = _hold_in_another_operation(lambda: claims.claim_dataset_name("fb-rebuild-claims"))
    try:  # a builder holds the name (it is rebuilding it): a writer on that dataset is refused
        with pytest.raises(claims.ClaimError, match="being rebuilt"):
            balance_report(ds, "ground_truth", run_key="during_rebuild")
        assert "during_rebuild" not in ds.list_runs()
    finally:
        release.set()
        thread.join()
    rebuilt = colored_digits("fb-rebuild-claims", **kw)  # nobody holds it now: the rebuild goes through
    assert len(rebuilt) == len(ids) and set(rebuilt.values("id")) != ids
    balance_report(rebuilt, "ground_truth", run_key="after")
    assert "after" in rebuilt.list_runs()
    rebuilt.delete()
