"""The 1,000,000-sample figures: time and peak memory of the Balance panel summary, X-means on
N x 20, write-back of N labels and the SA re-query on N stored embeddings, each against a
baseline run on the same data.

One dataset of N samples is built once (synthetic filepaths, whose media is never read: 20
pseudo-label clusters x 5 colours, 10% generated, a 512-d L2-normalised float32 embedding per
sample, as ViT-B-32 stores), by bulk inserts of sample documents (see ``build``). Every step
and variant then runs in a fresh Python process, so that its memory is its own:

- time: median of ``--repeats`` calls (``--slow-repeats``, default 1, for X-means'
  pyclustering backend, the write-backs and the re-query);
- peak memory: the process's peak resident set size during the calls minus its resident
  size just before them (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; MongoDB's
  own memory is another process and not counted). "one copy" is the size of the data the
  step works on, held once: the ``peak / one copy`` column is the check that no step holds
  all the features (or labels) twice.

The re-query uses a tiny random CLIP with ViT-B-32's 512-d output (no weights offline) and
20 given related texts (choosing them from WordNet needs the model's gloss cache, timed by
``bench_sa.py requery``). Usage:
    python benchmarks/bench_scale.py [--n 1000000] [--repeats 3] [--steps panel xmeans writeback requery read]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EMBED_DIM = 512
RELATED_TEXTS = [f"{c} {w}" for c in ("red", "green", "blue", "yellow", "purple") for w in
                 ("hair", "background", "clothing", "light")]
STEPS = {  # step: its variants, the baseline first
    "panel": ["values_counter", "count_values", "balance_summary", "balance_summary_cached"],
    "xmeans": ["sklearn_kmeans_k6", "xmeans_sklearn", "xmeans_auto"],
    "writeback": ["plain_set_values", "set_values_by_id"],
    "requery": ["plain_numpy", "compute_sa_features"],
    "read": ["values_stack", "embeddings_load"],
}
LABELS = {
    "values_counter": "baseline: values() of 3 fields + Counter",
    "count_values": "FiftyOne count_values (one field, a floor)",
    "balance_summary": "fairbalance balance_summary, one $group pass",
    "balance_summary_cached": "balance_summary(cache=True): the panel, unchanged data",
    "sklearn_kmeans_k6": "baseline: sklearn KMeans, K=6 given",
    "xmeans_sklearn": "fairbalance xmeans, sklearn backend",
    "xmeans_auto": "fairbalance xmeans, default backend=auto",
    "plain_set_values": "baseline: FiftyOne set_values(key_field=id)",
    "set_values_by_id": "fairbalance writeback.set_values_by_id",
    "plain_numpy": "baseline: values() + np.stack + matmul + set_values",
    "compute_sa_features": "fairbalance compute_sa_features (overwrite)",
    "values_stack": "baseline: np.stack(values()) of the embeddings",
    "embeddings_load": "fairbalance embeddings.load (one pass, fast decode)",
}


# ---------------------------------------------------------------- memory of this process

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def reset_peak() -> int:
    """Reset the peak-RSS mark of this process; returns the resident bytes now."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_since(base: int) -> int:
    return _status_kb("VmHWM") * 1024 - base


def rss() -> int:
    return _status_kb("VmRSS") * 1024


def measure(fn, repeats: int):
    """``(times, peak bytes above the RSS before the first call, last result)``."""
    base = reset_peak()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, peak_since(base), out


# ---------------------------------------------------------------- the dataset

def build(name: str, n: int, clip_name: str):
    """N samples: one added with ``add_samples`` (which sets the schema), then N - 1 copies of its
    database document with their own ids, labels and embeddings, inserted 10,000 at a time with
    ``insert_many`` (what ``add_samples`` writes, without building a ``Sample`` per row: 1M
    ``Sample`` objects took ~2 h here, 20,000 took 158 s)."""
    import fiftyone as fo
    import fiftyone.core.utils as fou
    from bson import ObjectId

    from fairbalance.core import models
    from fairbalance.find import embeddings

    rng = np.random.default_rng(0)
    p = np.arange(20, 0, -1) / 210

    def label(c):
        return fo.Classification(label=c)

    ds = fo.Dataset(name, persistent=True)
    ds.add_sample(fo.Sample(filepath="/bench/scale/0.png", sa_cluster=label("0"), color=label("colour0"), generated=True,
                            clip_embedding=np.full(EMBED_DIM, EMBED_DIM ** -0.5, dtype=np.float32)))
    coll = ds._sample_collection
    template = coll.find_one()
    for start in range(1, n, 10_000):
        m = min(10_000, n - start)
        clusters, colours = rng.choice(20, size=m, p=p), rng.choice(5, size=m)
        emb = rng.standard_normal((m, EMBED_DIM), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        docs = []
        for k in range(m):
            i = start + k
            docs.append({
                **template, "_id": ObjectId(), "filepath": f"/bench/scale/{i}.png", "_rand": float(rng.random()),
                "sa_cluster": {**template["sa_cluster"], "_id": ObjectId(), "label": str(clusters[k])},
                "color": {**template["color"], "_id": ObjectId(), "label": f"colour{colours[k]}"},
                "generated": bool(i % 10 == 0), "clip_embedding": fou.serialize_numpy_array(emb[k]),
            })
        coll.insert_many(docs, ordered=False)
    field = ds.get_field("clip_embedding")  # as embeddings.write records the model that made them
    field.info = {embeddings.MODEL_INFO_KEY: models.load_clip(clip_name, None, device="cpu").spec.to_dict()}
    field.save()
    assert len(ds) == n
    return ds


# ---------------------------------------------------------------- one step, one variant (child process)

def run_child(step: str, variant: str, args) -> dict:
    import fiftyone as fo

    ds = fo.load_dataset(args.dataset)
    n = len(ds)
    res: dict = {}
    if step == "panel":
        sys.path.insert(0, HERE)
        from bench_panel import python_counts

        from fairbalance.find import balance

        fns = {
            "values_counter": lambda: dict(python_counts(ds, "sa_cluster", "color")[1]),
            "count_values": lambda: ds.count_values("sa_cluster.label"),
            "balance_summary": lambda: balance.balance_summary(ds, "sa_cluster", attribute_field="color")["after"]["counts"],
            "balance_summary_cached": lambda: balance.balance_summary(
                ds, "sa_cluster", attribute_field="color", cache=True)["after"]["counts"],
        }
        if variant == "balance_summary_cached":  # the first call computes and stores; a change of data does again
            from fairbalance.core import summary_cache

            summary_cache.clear(ds)
            first, _, _ = measure(fns[variant], 1)
            res["phases"] = {"first_call": first[0]}
        times, peak, counts = measure(fns[variant], args.repeats)
        res["counts"] = {str(k): int(v) for k, v in counts.items()}
    elif step == "xmeans":
        sys.path.insert(0, HERE)
        from bench_sa import blobs
        from sklearn.metrics import adjusted_rand_score

        from fairbalance.find import clustering

        x, y = blobs(n)
        x = np.ascontiguousarray(x, dtype=np.float64)
        res["one_copy"] = x.nbytes
        if variant == "sklearn_kmeans_k6":
            from sklearn.cluster import KMeans

            fn, reps = (lambda: KMeans(n_clusters=6, n_init=1, random_state=0).fit(x).labels_), args.repeats
        elif variant == "xmeans_sklearn":
            fn, reps = (lambda: clustering.xmeans(x, criterion="pyclustering", backend="sklearn").labels), args.repeats
        else:
            res["backend"] = "pyclustering" if clustering.pyclustering_available() else "sklearn"
            fn, reps = (lambda: clustering.xmeans(x).labels), args.slow_repeats
        times, peak, labels = measure(fn, reps)
        res["k"] = int(len(np.unique(labels)))
        res["ari"] = float(adjusted_rand_score(y, labels))
    elif step == "writeback":
        from fairbalance.core import writeback

        ids = ds.values("id")
        before = rss()
        values = {i: fo.Classification(label=str(j % 20)) for j, i in enumerate(ids)}
        res["one_copy"] = rss() - before
        if variant == "plain_set_values":
            fn = lambda: ds.set_values("label_plain", values, key_field="id")  # noqa: E731
        else:
            fn = lambda: writeback.set_values_by_id(ds, {"label_fb": values})  # noqa: E731
        times, peak, _ = measure(fn, args.slow_repeats)
    elif step == "requery":
        from fairbalance.core import models
        from fairbalance.find.sa_features import compute_sa_features

        res["one_copy"] = n * EMBED_DIM * 4
        if variant == "plain_numpy":
            clip = models.load_clip(args.clip, None, device="cpu")
            text = clip.encode_text([f"a photo of a {t}" for t in RELATED_TEXTS]).numpy()
            phases = {}

            def fn():
                t = time.perf_counter()
                emb = np.stack(ds.values("clip_embedding"))
                phases["read"] = time.perf_counter() - t
                t = time.perf_counter()
                feats = emb @ text.T  # stored embeddings are L2-normalised
                phases["matmul"] = time.perf_counter() - t
                t = time.perf_counter()
                ds.set_values("sa_plain", list(feats))
                phases["write"] = time.perf_counter() - t

            times, peak, _ = measure(fn, args.slow_repeats)
            res["phases"] = phases
        else:
            def fn():
                return compute_sa_features(ds, related_texts_override=RELATED_TEXTS, model=args.clip, pretrained=None,
                                           device="cpu", features_field="sa_fb", run_key="sa_requery", overwrite=True,
                                           num_workers=0, progress=False)

            times, peak, _ = measure(fn, args.slow_repeats)
    elif step == "read":  # the read phase of the re-query: all stored embeddings into one matrix
        from fairbalance.find import embeddings

        res["one_copy"] = n * EMBED_DIM * 4
        if variant == "values_stack":
            fn = lambda: np.stack(ds.values("clip_embedding")).astype(np.float32)  # noqa: E731
        else:
            fn = lambda: embeddings.load(ds, "clip_embedding")[1]  # noqa: E731
        times, peak, matrix = measure(fn, args.slow_repeats)
        res["checksum"] = float(np.float64(matrix[::997].sum()))
    else:
        raise ValueError(step)
    res.update(times=times, peak=peak, maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return res


def child(step: str, variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, variant, "--dataset", args.dataset,
           "--clip", args.clip, "--repeats", str(args.repeats), "--slow-repeats", str(args.slow_repeats)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {out.returncode}", "output": out.stdout[-2000:]}


# ---------------------------------------------------------------- report

def _gb(b):
    return f"{b / 2**30:6.2f} GB" if b is not None else "     —   "


def report(step: str, results: dict, n: int):
    base = results[STEPS[step][0]]
    base_t = statistics.median(base["times"]) if "times" in base else None
    print(f"\n{step} on {n:,} samples")
    print(f"  {'variant':<55} {'median s':>9} {'runs':>4} {'speed vs base':>13} {'peak ΔRSS':>10} "
          f"{'one copy':>10} {'peak/copy':>9}")
    for variant in STEPS[step]:
        r = results[variant]
        if "error" in r:
            print(f"  {LABELS[variant]:<55} FAILED ({r['error']}):\n{r['output']}")
            continue
        t = statistics.median(r["times"])
        ratio = f"{base_t / t:12.2f}x" if base_t else ""
        copy = r.get("one_copy")
        per = f"{r['peak'] / copy:8.2f}x" if copy else "      n/a"
        print(f"  {LABELS[variant]:<55} {t:9.3f} {len(r['times']):>4} {ratio:>13} {_gb(r['peak']):>10} "
              f"{_gb(copy):>10} {per:>9}")
        extra = {k: r[k] for k in ("k", "ari", "backend", "phases") if k in r}
        if extra:
            print(f"  {'':<55} {json.dumps(extra, default=lambda v: round(v, 3))}")


def check(step: str, results: dict, ds):
    """The variants computed the same thing."""
    ds.reload()
    ok = [r for r in results.values() if "error" not in r]
    if step == "panel":
        assert all(r["counts"] == ok[0]["counts"] for r in ok), "panel counts differ"
    elif step == "xmeans":
        assert all(r["ari"] > 0.99 for r in ok), "a clustering missed the 6 clusters"
    elif step == "writeback" and len(ok) == 2:
        assert ds.count_values("label_fb.label") == ds.count_values("label_plain.label"), "write-backs differ"
    elif step == "read" and len(ok) == 2:
        assert ok[0]["checksum"] == ok[1]["checksum"], "read matrices differ"
    elif step == "requery" and len(ok) == 2:
        a, b = ds.limit(1000).values(["sa_fb", "sa_plain"])
        assert np.allclose(np.stack(a), np.stack(b), atol=1e-5), "re-query features differ"
    print(f"  same result: checked ({step})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-repeats", type=int, default=1)
    ap.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    ap.add_argument("--child", nargs=2, metavar=("STEP", "VARIANT"))
    ap.add_argument("--dataset")
    ap.add_argument("--clip")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(*args.child, args)), flush=True)
        return

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import tiny_models

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.clip = tiny_models.build_open_clip(os.path.join(tmp, "clip"), embed_dim=EMBED_DIM)
        args.dataset = f"fb-bench-scale-{os.getpid()}"
        t = time.perf_counter()
        ds = build(args.dataset, args.n, args.clip)
        print(f"{args.n:,} samples ({EMBED_DIM}-d embeddings) built in {time.perf_counter() - t:.0f} s")
        try:
            for step in args.steps:
                results = {v: child(step, v, args) for v in STEPS[step]}
                report(step, results, args.n)
                check(step, results, ds)
        finally:
            ds.delete()
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; times are medians of --repeats {args.repeats} "
          f"(--slow-repeats {args.slow_repeats} for the slow variants)")


if __name__ == "__main__":
    main()
