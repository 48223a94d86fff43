"""Test environment: a private MongoDB directory, offline hub, the plugin on FiftyOne's path.

Set before FiftyOne is imported: tests run on a real mongod with their own
database directory (removed at exit), never touch the network for models,
and find the plugin through FiftyOne's own discovery.
"""

import atexit
import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP = tempfile.mkdtemp(prefix="fairbalance-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)  # runs after FiftyOne stops mongod

if not os.environ.get("FIFTYONE_DATABASE_URI"):
    os.environ["FIFTYONE_DATABASE_DIR"] = os.path.join(_TMP, "db")
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FAIRBALANCE_DATA_DIR"] = os.path.join(_TMP, "data")
os.environ["FAIRBALANCE_CACHE_DIR"] = os.path.join(_TMP, "cache")
_PLUGINS = os.path.join(_TMP, "plugins")
os.makedirs(_PLUGINS)
os.symlink(REPO_ROOT, os.path.join(_PLUGINS, "fairbalance"))
os.environ["FIFTYONE_PLUGINS_DIR"] = _PLUGINS
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fiftyone as fo  # noqa: E402
import pytest  # noqa: E402

import tiny_models  # noqa: E402


@pytest.fixture
def make_dataset(request):
    """Factory for non-persistent datasets that are deleted after the test."""
    created = []

    def make(name=None):
        ds = fo.Dataset(name)
        created.append(ds.name)
        return ds

    yield make
    for name in created:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


@pytest.fixture(scope="session")
def digits_dataset():
    """A small Colored Digits dataset shared by read-only tests."""
    from fairbalance import datasets

    ds = datasets.colored_digits(
        name="fb-test-digits", train_per_class=30, test_per_class=10, conflict_ratio=0.05,
        persistent=False, overwrite=True,
    )
    yield ds
    if fo.dataset_exists(ds.name):
        fo.delete_dataset(ds.name)


@pytest.fixture
def digits_copy(digits_dataset):
    """A writable clone of the shared digits dataset."""
    ds = digits_dataset.clone()
    yield ds
    ds.delete()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_clip(model_dir):
    return tiny_models.build_open_clip(str(model_dir / "clip"))
