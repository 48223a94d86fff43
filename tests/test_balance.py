import math

import fiftyone as fo
import pytest

from fairbalance.core import runs
from fairbalance.find import balance
from fairbalance.core.validation import FairBalanceError


@pytest.mark.parametrize(
    "percent, expected",
    [
        ([45.80, 20.56, 15.60, 18.10], 1.282),  # Suayama & Nakamura, Table II (A)
        ([27.95, 22.15, 25.80, 24.10], 1.383),  # Table II (F)
        ([21.13, 50.68, 15.49, 9.09, 3.61], 1.300),  # Table IV (A)
    ],
)
def test_entropy_reproduces_paper(percent, expected):
    assert balance.entropy(percent) == pytest.approx(expected, abs=5e-4)


def test_entropy_edge_cases():
    assert balance.entropy([10]) == 0.0
    assert balance.entropy([]) == 0.0
    assert balance.entropy({"a": 5, "b": 5}) == pytest.approx(math.log(2))
    assert balance.normalized_entropy([3, 3, 3]) == pytest.approx(1.0)
    assert balance.normalized_entropy([7]) == 0.0
    with pytest.raises(ValueError):
        balance.entropy([1, -1])


def test_balance_report_counts_and_cross_table(digits_dataset):
    train = digits_dataset.match_tags("train")
    report = balance.balance_report(train, "ground_truth", attribute_field="color")
    assert report.num_classes == 10
    assert sum(report.counts.values()) == len(train) == 300
    assert report.normalized_entropy == pytest.approx(1.0)
    assert report.imbalance_ratio == 1.0
    assert list(report.counts)[:3] == ["0", "1", "2"]  # numeric labels in numeric order
    rows = {r.cluster: r for r in report.cross_table}
    # 5% conflicting: the class colour is the majority of every class
    assert rows["0"].majority == "red" and rows["3"].majority == "blue"
    assert all(r.purity >= 0.9 for r in report.cross_table)
    assert sum(r.count for r in report.cross_table) == 300
    assert "entropy" in report.format()


def test_balance_report_imbalanced_and_missing(make_dataset):
    ds = make_dataset()
    labels = ["a"] * 6 + ["b"] * 3 + ["c"] * 1 + [None] * 2
    ds.add_samples(
        [fo.Sample(filepath=f"/x/{i}.png", y=fo.Classification(label=l) if l else None, flag=i % 2 == 0)
         for i, l in enumerate(labels)]
    )
    report = balance.balance_report(ds, "y")
    assert report.counts == {"a": 6, "b": 3, "c": 1}
    assert report.num_missing == 2 and report.num_samples == 12
    assert report.imbalance_ratio == 6.0
    assert report.entropy == pytest.approx(balance.entropy([6, 3, 1]))
    assert balance.balance_report(ds, "flag").counts == {"False": 6, "True": 6}


def test_balance_report_bad_input(make_dataset, digits_dataset):
    with pytest.raises(FairBalanceError, match="not found"):
        balance.balance_report(digits_dataset, "nope")
    with pytest.raises(FairBalanceError, match="empty"):
        balance.balance_report(digits_dataset.limit(0), "ground_truth")
    with pytest.raises(ValueError, match="Classification"):
        balance.balance_report(digits_dataset, "metadata")
    ds = make_dataset()
    ds.add_sample(fo.Sample(filepath="/x/1.png"))
    ds.add_sample_field("y", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    with pytest.raises(ValueError, match="no values"):
        balance.balance_report(ds, "y")


def test_balance_report_saved_as_run(digits_copy):
    report = balance.balance_report(digits_copy, "color", run_key="before")
    assert runs.get_run_config(digits_copy, "before")["method"] == "fairbalance.balance_report"
    saved = runs.load_run_results(digits_copy, "before")
    assert saved["counts"] == report.counts
    assert saved["entropy"] == pytest.approx(report.entropy)
    with pytest.raises(FairBalanceError, match="already exists"):
        balance.balance_report(digits_copy, "color", run_key="before")
    balance.balance_report(digits_copy.match_tags("test"), "color", run_key="before", overwrite=True)
    assert sum(runs.load_run_results(digits_copy, "before")["counts"].values()) == 100


def test_balance_summary_counts_match_python_counting(make_dataset):
    """The panel's single aggregation: before (real only), after (all), missing labels, cross table."""
    from collections import Counter

    ds = make_dataset()
    rows = [(str(i % 3) if i % 7 else None, f"c{i % 2}" if i % 5 else None, i % 4 == 0) for i in range(60)]
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", generated=g,
                              cluster=fo.Classification(label=c) if c else None,
                              color=fo.Classification(label=a) if a else None)
                    for i, (c, a, g) in enumerate(rows)])
    summary = balance.balance_summary(ds, "cluster", attribute_field="color")
    real = [r for r in rows if not r[2]]
    assert summary["before"]["counts"] == dict(Counter(c for c, _, _ in real if c))
    assert summary["before"]["num_missing"] == sum(1 for c, _, _ in real if c is None)
    assert summary["after"]["counts"] == dict(Counter(c for c, _, _ in rows if c))
    assert summary["after"]["num_samples"] == 60
    cross = Counter((c, a) for c, a, _ in real if c and a)
    for cluster, row in zip(summary["heatmap"]["y"], summary["heatmap"]["z"]):
        n = sum(v for (c, _), v in cross.items() if c == cluster)
        assert row == [cross[(cluster, a)] / n for a in summary["heatmap"]["x"]]
    ds.set_values("generated", [False] * 60)  # no generated samples: no "after"
    assert balance.balance_summary(ds, "cluster")["after"] is None


def test_cached_summary_is_reused_only_while_the_dataset_is_unchanged(make_dataset):
    """The panel's cache: a stored summary is served while the stamp holds; any edit, deletion or run invalidates it."""
    import time

    from fairbalance.core import summary_cache

    ds = make_dataset()
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", cluster=fo.Classification(label=str(i % 3)),
                              color=fo.Classification(label=f"c{i % 2}")) for i in range(30)])
    view = ds.match(fo.ViewField("cluster.label") != "2")
    time.sleep(summary_cache.SETTLE_S + 0.2)  # writes this recent are never cached (same-millisecond writes)
    plain = balance.balance_summary(view, "cluster", attribute_field="color")
    assert balance.balance_summary(view, "cluster", attribute_field="color", cache=True) == plain
    coll = summary_cache._db()[summary_cache.COLLECTION]
    key = summary_cache.cache_key(view, balance.SUMMARY_CACHE_NAME,
                                  {"label_field": "cluster", "attribute_field": "color",
                                   "generated_field": "generated", "sa_run_key": None})
    assert coll.find_one({"_id": key}) is not None
    # served from the store: plant a marker value and get it back
    coll.update_one({"_id": key}, {"$set": {"value": '{"marker": 1}'}})
    assert balance.balance_summary(view, "cluster", attribute_field="color", cache=True) == {"marker": 1}
    # another view or other arguments are other entries
    assert balance.balance_summary(ds, "cluster", cache=True)["after"] is None
    assert balance.balance_summary(ds, "cluster", cache=True)["before"]["num_samples"] == 30

    def fresh():
        return balance.balance_summary(view, "cluster", attribute_field="color", cache=True)

    edits = [
        lambda: ds.set_values("cluster", [fo.Classification(label="0")] * 30),  # a sample edit
        lambda: ds.delete_samples(ds.take(3, seed=0)),  # a deletion
        lambda: ds.add_sample_field("note", fo.StringField),  # the schema
    ]
    for edit in edits:
        coll.update_many({}, {"$set": {"value": '{"marker": 1}'}})
        edit()
        assert fresh() == balance.balance_summary(view, "cluster", attribute_field="color")
    assert fresh()["before"]["counts"] == {"0": 27}
    # a long set_values stamps all its batches with the time it began: its later batches keep the newest time.
    # As FiftyOne writes: a first batch (one sample) at `began`, the summary cached, then a later batch at `began`
    import datetime

    samples_coll = ds._sample_collection
    began = datetime.datetime.utcnow().replace(microsecond=0) - datetime.timedelta(seconds=5)
    ids = [d["_id"] for d in samples_coll.find({}, {"_id": 1})]
    samples_coll.update_many({}, {"$set": {"last_modified_at": began - datetime.timedelta(seconds=60)}})
    samples_coll.update_one({"_id": ids[0]}, {"$set": {"last_modified_at": began}})
    time.sleep(summary_cache.SETTLE_S + 0.2)  # (the schema edit above is that recent)
    assert fresh()["before"]["counts"] == {"0": 27}
    assert coll.find_one({"_id": key})["stamp"] == summary_cache.stamp(view)  # stored: served while it holds
    samples_coll.update_many({"_id": {"$in": ids[1:6]}}, {"$set": {"cluster.label": "1", "last_modified_at": began}})
    assert fresh() == balance.balance_summary(view, "cluster", attribute_field="color")
    assert fresh()["before"]["counts"] == {"0": 22, "1": 5}
    assert summary_cache.clear(ds) >= 1 and coll.count_documents({"dataset_id": str(ds._doc.id)}) == 0
