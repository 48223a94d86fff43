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
    # the C core alone (the valley merge after it would make one cluster of this uniform data whatever its splits)
    runs = {tuple(clustering._xmeans_pyclustering(x, 20, 2, seed).labels) for _ in range(4)}
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


def _stroke_colours(view) -> np.ndarray:
    """The colour stand-in for SA features: each image's mean RGB over its stroke pixels (max channel > 0.3)."""
    from fairbalance.core import images

    out = []
    for path in view.values("filepath"):
        a = np.asarray(images.load_rgb(path), dtype=np.float32) / 255.0
        out.append(a[a.max(-1) > 0.3].mean(0))
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("build", ["a", "b"])
def test_xmeans_finds_the_ten_colours_of_both_colored_mnist_builds(build, tmp_path):
    """Issue #28: on build b (saturated hue palette, noise 0.03) X-means cut each of the ten colours in two (20 =
    kmax): its spherical model splits elongated / clipped clusters. Both backends must find the ten colours."""
    import importlib

    import fiftyone as fo

    from fairbalance.core import writeback
    from fairbalance.find.pseudo_labels import compute_pseudo_labels

    cm = importlib.import_module("fairbalance.datasets.colored_mnist")
    args = dict(conflict_ratio=0.01, seed=0, color_std=0.05, num_test=1000) if build == "a" else \
        dict(conflict_ratio=0.01, seed=1, color_std=0.03, num_test=800, palette=cm.HUE_PALETTE)
    name = f"fb-xmeans-colours-{build}"
    ds = cm.colored_mnist(name, num_val=200, output_dir=str(tmp_path / "data"), overwrite=True, **args)
    try:
        train = ds.match_tags("train")
        x = _stroke_colours(train)
        writeback.set_values_by_id(train, {"sa_features": dict(zip(train.values("id"), x))})
        true = np.array([ds.classes["color"].index(c) for c in train.values("color.label")])
        for backend in ("sklearn", "pyclustering"):
            if backend == "pyclustering" and not clustering.pyclustering_available():
                continue
            res = compute_pseudo_labels(train, kmax=20, backend=backend, seed=0, overwrite=True)
            assert res.num_clusters == 10, (backend, res.counts)
            found = [int(v) for v in train.values("sa_cluster.label")]
            assert adjusted_rand_score(true, found) > 0.99
        assert clustering.xmeans(x, kmax=20, criterion="bic", backend="sklearn").n_clusters == 10
    finally:
        fo.delete_dataset(name)


def test_valley_ratio_tells_separate_groups_from_halves_of_one():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(600, 3)) * [1.0, 1.0, 3.0]  # elongated: k-means would cut it along the long axis
    halves = one[:, 2] < 0
    assert clustering.valley_ratio(one[halves], one[~halves]) > 0.9
    two = np.vstack([rng.normal(size=(300, 3)), rng.normal(size=(300, 3)) + [6, 0, 0]])
    assert clustering.valley_ratio(two[:300], two[300:]) < 0.3


@pytest.mark.parametrize("backend", ["sklearn", "pyclustering"])
def test_xmeans_keeps_an_elongated_or_clipped_cluster_whole(backend):
    """Three well-separated clusters, each stretched 4:1 and with half its values of one channel clipped at 0."""
    if backend == "pyclustering" and not clustering.pyclustering_available():
        pytest.skip("pyclustering's C core is not available on this platform")
    rng = np.random.default_rng(1)
    parts = []
    for centre in ([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]):
        c = np.array(centre)
        pts = c + rng.normal(scale=0.012, size=(500, 3)) + np.outer(rng.normal(scale=0.05, size=500), c)
        pts[:, np.argmin(c)] = np.clip(pts[:, np.argmin(c)] - 0.1, 0, None)  # clipped at 0: half exactly 0
        parts.append(pts)
    x = np.vstack(parts)
    y = np.repeat([0, 1, 2], 500)
    result = clustering.xmeans(x, kmax=20, backend=backend, seed=0)
    assert result.n_clusters == 3
    assert adjusted_rand_score(y, result.labels) > 0.99
