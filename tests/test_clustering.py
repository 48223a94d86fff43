import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from fairbalance.find import clustering

# unequal cluster sizes, like the paper's tables
SIZES = [400, 200, 120, 60, 40]


@pytest.fixture(scope="module")
def blobs():
    return make_blobs(n_samples=SIZES, n_features=20, cluster_std=1.0, center_box=(-20, 20), random_state=1)


@pytest.mark.parametrize(
    "criterion, backend",
    [("bic", "sklearn"), ("pyclustering", "sklearn"), ("pyclustering", "pyclustering")],
)
def test_xmeans_recovers_well_separated_clusters(blobs, criterion, backend):
    if backend == "pyclustering" and not clustering.pyclustering_available():
        pytest.skip("pyclustering's C core is not available on this platform")
    x, y = blobs
    result = clustering.xmeans(x, kmax=20, criterion=criterion, backend=backend, seed=0)
    assert result.n_clusters == len(SIZES)
    assert adjusted_rand_score(y, result.labels) > 0.99
    assert result.backend == backend and result.criterion == criterion


def test_sklearn_and_pyclustering_backends_agree(blobs):
    if not clustering.pyclustering_available():
        pytest.skip("pyclustering's C core is not available on this platform")
    x, _ = blobs
    ours = clustering.xmeans(x, criterion="pyclustering", backend="sklearn")
    ref = clustering.xmeans(x, criterion="pyclustering", backend="pyclustering")
    assert adjusted_rand_score(ours.labels, ref.labels) > 0.99


def test_auto_backend_leaves_the_c_core_for_large_data(blobs, monkeypatch):
    """pyclustering's C core copies the data into Python lists (10x its memory at 1M x 20): auto avoids it there."""
    if not clustering.pyclustering_available():
        pytest.skip("pyclustering's C core is not available on this platform")
    x, y = blobs
    assert clustering.xmeans(x).backend == "pyclustering"  # small data: the reference implementation
    monkeypatch.setattr(clustering, "C_CORE_MAX_VALUES", x.size - 1)
    large = clustering.xmeans(x)
    assert large.backend == "sklearn" and large.criterion == "pyclustering"
    assert adjusted_rand_score(y, large.labels) > 0.99


@pytest.mark.parametrize("seed", [0, 3])
def test_pyclustering_backend_is_deterministic_for_every_seed(seed):
    """pyclustering reads random_state=0 as "unseeded"; seed 0 must still give the same clusters every run."""
    if not clustering.pyclustering_available():
        pytest.skip("pyclustering's C core is not available on this platform")
    x = np.random.default_rng(0).uniform(size=(600, 2))  # no true clusters: the splits depend on the seed
    runs = {tuple(clustering.xmeans(x, kmax=20, backend="pyclustering", seed=seed).labels) for _ in range(4)}
    assert len(runs) == 1


def test_xmeans_respects_kmax(blobs):
    x, _ = blobs
    result = clustering.xmeans(x, kmax=3, criterion="bic", backend="sklearn")
    assert result.n_clusters == 3
    assert result.history[-1] == 3


def test_xmeans_is_deterministic(blobs):
    x, _ = blobs
    a = clustering.xmeans(x, criterion="bic", backend="sklearn", seed=3)
    b = clustering.xmeans(x, criterion="bic", backend="sklearn", seed=3)
    assert np.array_equal(a.labels, b.labels)


def test_splitting_score_prefers_true_split():
    rng = np.random.RandomState(0)
    x = np.vstack([rng.randn(100, 2), rng.randn(100, 2) + 10])
    one = clustering.splitting_score(x, np.zeros(200, dtype=int), x.mean(0, keepdims=True))
    labels = np.repeat([0, 1], 100)
    two = clustering.splitting_score(x, labels, np.stack([x[:100].mean(0), x[100:].mean(0)]))
    assert two > one
    # pyclustering's penalty is subtracted once per cluster: never more lenient than the paper's BIC
    two_pc = clustering.splitting_score(x, labels, np.stack([x[:100].mean(0), x[100:].mean(0)]), "pyclustering")
    assert two_pc < two


@pytest.mark.parametrize(
    "kwargs", [{"criterion": "nope"}, {"backend": "nope"}, {"kmax": 1, "kinit": 2},
               {"criterion": "bic", "backend": "pyclustering"}],
)
def test_xmeans_bad_arguments(blobs, kwargs):
    with pytest.raises(ValueError):
        clustering.xmeans(blobs[0], **kwargs)
