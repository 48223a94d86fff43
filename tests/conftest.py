"""Test environment: a private mongod, offline hub, the plugin on FiftyOne's path.

Set before FiftyOne is imported: tests run on a real mongod of their own
(a free port, a temporary database directory, both gone at exit), never touch the network for models,
and find the plugin through FiftyOne's own discovery.
"""

import atexit
import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP = tempfile.mkdtemp(prefix="fairbalance-tests-")


def _remove_when_gone(folder):
    """Remove ``folder`` in a process of its own that outlives this one (``rm -rf``; in this process without ``rm``).

    After a slow run the session's folder holds the images, models and database files of every test: removing it
    here kept pytest alive for ~45 s after its summary (stacks sampled every 2 s at exit: 44 s in this rmtree, ~5 s
    in all the rest). Nothing uses the folder once the session's mongod has stopped (which runs before this).
    """
    import subprocess

    rm = shutil.which("rm")
    if rm is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    subprocess.Popen([rm, "-rf", "--", folder], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


atexit.register(_remove_when_gone, _TMP)  # registered first, so it runs last


def session_folder(prefix):
    """A new folder inside the session's folder: removed with it, after the process (see :func:`_remove_when_gone`)."""
    return tempfile.mkdtemp(prefix=prefix, dir=_TMP)


def _start_private_mongod():
    """Our own mongod on a free port, stopped at exit; its URI, or None when no mongod is found.

    FiftyOne's database service attaches to any DB service already running on
    the machine, whatever its database directory: another test session, or
    the user's own App and datasets. A mongod of our own keeps tests apart.
    """
    import importlib.util
    import socket
    import subprocess
    import time

    # FiftyOne's own DatabaseService.find_mongod() would import fiftyone, which reads its config
    # (the database URI) at import time, so the binary is located the same way without importing it
    spec = importlib.util.find_spec("fiftyone")
    exe = os.path.join(spec.submodule_search_locations[0], "db", "bin", "mongod") if spec else ""
    if not os.access(exe, os.X_OK):
        exe = shutil.which("mongod")
    if not exe:
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dbpath, log = os.path.join(_TMP, "db"), os.path.join(_TMP, "mongod.log")
    os.makedirs(dbpath)
    proc = subprocess.Popen([exe, "--dbpath", dbpath, "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--logpath", log], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop():
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()  # gone before its files are removed

    atexit.register(stop)  # registered after the folder's removal, so it runs before it
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mongod exited with {proc.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"mongodb://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"mongod did not start on port {port} within 60 s; see {log}")


os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
# the tests' tiny models: one torch thread does the same work without a second thread's spin-waits (fast subset of
# test_plugin + test_sharding_generation on a busy 2-core machine: 57 s of CPU with one thread, 68 s with two);
# set OMP_NUM_THREADS to choose otherwise. Worker processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ["FAIRBALANCE_DATA_DIR"] = os.path.join(_TMP, "data")
os.environ["FAIRBALANCE_CACHE_DIR"] = os.path.join(_TMP, "cache")
# What depends only on its inputs' content (WordNet's noun glosses, their CLIP tokens: ~40 s of CPU in a session's
# first audit) is kept across test sessions, in folders keyed by that content; FAIRBALANCE_TEST_CACHE=off makes
# every session build them anew. The CLIP embeddings of the bank stay per session (the encoding is tested).
_SHARED = os.environ.get("FAIRBALANCE_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fairbalance-tests")
if _SHARED != "off":
    for _sub in ("wordnet_glosses", "gloss_tokens"):
        try:
            os.makedirs(os.path.join(_SHARED, _sub), exist_ok=True)
            os.makedirs(os.path.join(_TMP, "cache"), exist_ok=True)
            os.symlink(os.path.join(_SHARED, _sub), os.path.join(_TMP, "cache", _sub))
        except OSError:  # not writable: this session builds them in its own folder
            pass
_PLUGINS = os.path.join(_TMP, "plugins")
os.makedirs(_PLUGINS)
os.symlink(REPO_ROOT, os.path.join(_PLUGINS, "fairbalance"))
os.environ["FIFTYONE_PLUGINS_DIR"] = _PLUGINS
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

_OURS = "FAIRBALANCE_TESTS_MONGOD"  # the URI of the mongod a conftest started, to tell it from a user's


def pytest_configure(config):
    """The database, before any test module imports FiftyOne (which reads its URI at import).

    pytest-xdist's controller (``-n 2``) runs no test: it starts no mongod. Each of its workers starts
    its own, so no worker sees another's datasets; a worker that inherits the URI of a mongod that a
    conftest started (not a user's ``FIFTYONE_DATABASE_URI``) starts its own all the same.
    """
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    private_database()


def pytest_collection_modifyitems(config, items):
    """The browser modules' tests (``test_browser*.py``) are marked ``alone`` as well as ``slow``: they watch what
    the App shows as it happens, so CI runs them in one process with nothing beside them, after the other slow tests
    (which run on 2 xdist workers: see ``.ci/run``). By the module's name, so a new browser module is never missed."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.startswith("test_browser"):
            item.add_marker(pytest.mark.alone)


def private_database():
    """Point FiftyOne at a mongod of our own (started here) unless the user set a database; also what the
    benchmarks that ``import conftest`` call before they import FiftyOne."""
    uri = os.environ.get("FIFTYONE_DATABASE_URI")
    if uri and not (os.environ.get("PYTEST_XDIST_WORKER") and uri == os.environ.get(_OURS)):
        return  # the user's database
    if "fiftyone" in sys.modules:
        raise RuntimeError("fiftyone was imported before tests/conftest.py chose the tests' database")
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    uri = _start_private_mongod()
    if uri:
        os.environ["FIFTYONE_DATABASE_URI"] = os.environ[_OURS] = uri
    else:
        os.environ["FIFTYONE_DATABASE_DIR"] = os.path.join(_TMP, "db")


@pytest.fixture
def make_dataset(request):
    """Factory for non-persistent datasets that are deleted after the test."""
    import fiftyone as fo

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
    import fiftyone as fo

    from fairbalance.datasets import colored_digits as datasets

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
    import tiny_models

    return tiny_models.build_open_clip(str(model_dir / "clip"))


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """One App server (``fiftyone.server.main`` on loopback, the plugin on its path) for the whole session: its URL.

    Shared by the modules that drive the App (HTTP, progress stream, the browser modules): each opens its own
    dataset by its URL, so a server that has served another module's dataset serves the same pages, and its
    process has torch, the models' libraries and the plugin already imported. A module that needs a server of
    its own (one that has opened no dataset yet, or other settings) defines an ``app_server`` of module scope.
    """
    from test_app_server import serve_app

    yield from serve_app(tmp_path_factory)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two fighting other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
