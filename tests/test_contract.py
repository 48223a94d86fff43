"""The contract every operation keeps: no lost data, no duplicates, claims between processes, one meaning of overwrite.

The concurrency cases run real second processes against the test MongoDB and
kill them with SIGKILL mid-work.
"""

import datetime as dt
import glob
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fairbalance as fb
from fairbalance.core import claims, runs
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)

WORKER = textwrap.dedent("""
    import sys, time
    import fiftyone as fo
    import fairbalance as fb
    from fairbalance.core import claims, runs

    what, name = sys.argv[1], sys.argv[2]
    ds = fo.load_dataset(name)
    if what == "generate":
        fb.generate_balanced(ds, "color", model=sys.argv[3], per_class=int(sys.argv[4]), num_inference_steps=30,
                             output_dir=sys.argv[5], batch_size=1, run_key="gen")
    elif what == "hold":  # claim a run key and its field, or a folder, then wait to be killed
        @claims.exclusive
        def hold():
            if sys.argv[3] == "folder":
                claims.claim_folder(sys.argv[4])
            else:
                runs.prepare(ds, sys.argv[3], "pseudo_labels", {}, [sys.argv[4]])
            print("held", flush=True)
            time.sleep(600)
        hold()
""")


def _start(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_claim(proc, prefix, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(c["_id"].startswith(prefix) and c["pid"] == proc.pid for c in claims.list_claims()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"worker never claimed {prefix}")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL  # killed mid-work, not finished


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """A persistent dataset (other processes load it by name) and a tiny diffusion model trained on it."""
    ds = fb.colored_digits("fb-contract", num_classes=3, train_per_class=10, test_per_class=2, persistent=True,
                           overwrite=True)
    model = fb.train_conditional_diffusion(ds, "color", output_dir=str(tmp_path_factory.mktemp("m") / "model"),
                                           epochs=1, **TINY)
    yield ds, model
    ds.delete()


@pytest.fixture
def fresh(colors):
    ds, model = colors
    clone = ds.clone(persistent=True)
    yield clone, model
    clone.delete()


def test_second_generator_refused_then_killed_writer_resumes_without_duplicates(fresh, tmp_path):
    ds, model = fresh
    out = tmp_path / "gen"
    worker = _start(tmp_path, "generate", ds.name, model.model_dir, 40, out)
    try:
        _wait_for_claim(worker, "dir:")
        with pytest.raises(fb.ClaimError, match="in use by a running operation"):
            fb.generate_balanced(ds, "color", model=model, per_class=40, num_inference_steps=30,
                                 output_dir=str(out), run_key="gen")
    finally:
        _kill(worker)
    before = len(ds.match_tags("generated"))
    assert before < 120  # the killed writer stopped part-way
    res = fb.generate_balanced(ds, "color", model=model, per_class=40, num_inference_steps=30, output_dir=str(out),
                               run_key="gen")
    gen = ds.match_tags("generated")
    paths = gen.values("filepath")
    assert len(paths) == len(set(paths)) == 120 == res.num_added + before
    assert sorted(glob.glob(str(out / "*.png"))) == sorted(paths)  # no temp files, no orphans
    assert not claims.list_claims()


@pytest.mark.parametrize("held", ["run", "field", "folder"])
def test_claims_refuse_before_any_work_and_die_with_their_holder(fresh, tmp_path, held):
    ds, _ = fresh
    ids = ds.values("id")
    rng = np.random.default_rng(0)
    ds.set_values("feats", [rng.normal(size=4).astype(np.float32) for _ in ids])
    if held == "folder":
        worker = _start(tmp_path, "hold", ds.name, "folder", tmp_path / "ckpt")
        prefix = "dir:"

        def call():
            return fb.train_classifier(ds, "ground_truth", epochs=1, output_dir=str(tmp_path / "ckpt"),
                                       run_key="clf")
    else:
        worker = _start(tmp_path, "hold", ds.name, "pl" if held == "run" else "someone_else", "sa_cluster")
        prefix = "run:" if held == "run" else "field:"

        def call():
            return fb.compute_pseudo_labels(ds, features_field="feats", label_field="sa_cluster", run_key="pl",
                                            method="kmeans", num_clusters=2)
    try:
        _wait_for_claim(worker, prefix)
        with pytest.raises(fb.ClaimError):
            call()
        assert not ds.has_field("sa_cluster") and not ds.has_run("pl") and not ds.has_run("clf")
    finally:
        _kill(worker)
    res = call()  # the holder died (SIGKILL): its claim is stale and taken over
    assert res.run_key in ds.list_runs()
    assert not claims.list_claims()


def test_stale_claims_of_other_hosts_expire_by_heartbeat(colors):
    ds, _ = colors
    coll = claims._collection()
    name = f"run:{ds._doc.id}:pseudo_labels"
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    doc = {"_id": name, "token": "t", "pid": 1, "host": "another-machine", "what": "x", "started": now}
    coll.insert_one({**doc, "heartbeat": now})
    try:
        with pytest.raises(fb.ClaimError, match="another-machine"):
            claims.exclusive(lambda: claims.claim_run(ds, "pseudo_labels"))()
        coll.update_one({"_id": name}, {"$set": {"heartbeat": now - dt.timedelta(seconds=claims.STALE_AFTER_S + 5)}})
        claims.exclusive(lambda: claims.claim_run(ds, "pseudo_labels"))()  # taken over, then released
        assert coll.find_one({"_id": name}) is None
    finally:
        coll.delete_many({"_id": name})


def test_claims_are_released_when_the_operation_fails(colors):
    ds, _ = colors
    with pytest.raises(FairBalanceError):
        fb.compute_pseudo_labels(ds, features_field="nope", run_key="pl_fail")
    assert not claims.list_claims()


def test_generation_run_key_reuse_resume_refuse_replace(fresh, tmp_path):
    ds, model = fresh
    kw = dict(model=model, per_class=2, num_inference_steps=2, run_key="g", output_dir=str(tmp_path / "g"))
    first = fb.generate_balanced(ds, "color", **kw)
    assert first.num_added == 6 and not first.resumed
    again = fb.generate_balanced(ds, "color", **kw)
    assert again.num_added == 0 and again.resumed and len(ds.match_tags("generated")) == 6
    other = {**kw, "output_dir": str(tmp_path / "g2")}
    with pytest.raises(FairBalanceError, match="differs in: guidance_scale"):
        fb.generate_balanced(ds, "color", **other, guidance_scale=1.0)
    assert len(ds.match_tags("generated")) == 6
    replaced = fb.generate_balanced(ds, "color", **other, guidance_scale=1.0, overwrite=True)
    gen = ds.match_tags("generated")
    assert replaced.num_added == 6 and len(gen) == 6  # the old run's samples and files went first
    assert set(gen.values("generation.guidance_scale")) == {1.0}
    assert not glob.glob(str(tmp_path / "g" / "*.png"))
    by_key = fb.generate_balanced(ds, "color", model_run="conditional_diffusion", per_class=2,
                                  num_inference_steps=2, run_key="g3", output_dir=str(tmp_path / "g3"))
    assert by_key.num_added == 6 and runs.get_run_config(ds, "g3")["model"] == model.model_dir
    with pytest.raises(FairBalanceError, match="exactly one of model"):
        fb.generate_balanced(ds, "color", model=model, model_run="conditional_diffusion", per_class=1)
    with pytest.raises(FairBalanceError, match="No 'conditional_diffusion' run 'nope'"):
        fb.generate_balanced(ds, "color", model_run="nope", per_class=1)


def test_diffusion_training_run_key_is_not_silently_replaced(fresh, tmp_path):
    ds, _ = fresh
    fb.train_conditional_diffusion(ds, "color", output_dir=str(tmp_path / "a"), epochs=1, run_key="d", **TINY)
    with pytest.raises(FairBalanceError, match="differs in: model_dir"):
        fb.train_conditional_diffusion(ds, "color", output_dir=str(tmp_path / "b"), epochs=1, run_key="d", **TINY)
    more = fb.train_conditional_diffusion(ds, "color", output_dir=str(tmp_path / "a"), epochs=2, run_key="d", **TINY)
    assert more.resumed_from_step == 2 and more.steps == 4  # 36 images / 32 per batch: 2 steps per epoch


def test_predictions_never_replace_fields_they_do_not_own(fresh, tmp_path):
    ds, _ = fresh
    clf = fb.train_classifier(ds, "ground_truth", epochs=1, run_key="clf", output_dir=str(tmp_path / "c"))
    assert clf.run_key == "clf" and clf.to_dict()["checkpoint"] == str(tmp_path / "c")
    with pytest.raises(FairBalanceError, match="would replace the labels"):
        fb.apply_classifier(ds, clf, "ground_truth")
    with pytest.raises(FairBalanceError, match="not written by fairbalance"):
        fb.apply_classifier(ds, clf, "color", overwrite=True)
    assert set(ds.distinct("color.label")) == {"red", "green", "yellow"}  # untouched
    res = fb.apply_classifier(ds, classifier_run="clf", predictions_field="preds")
    assert res.run_key == "preds" and res.num_predicted == len(ds) and ds.count("preds") == len(ds)
    with pytest.raises(FairBalanceError, match="already exists"):
        fb.apply_classifier(ds, clf, "preds")
    fb.apply_classifier(ds, clf, "preds", overwrite=True)
    with pytest.raises(FairBalanceError, match="scored against itself"):
        fb.evaluate_classifier(ds, "ground_truth", "ground_truth")
    ev = fb.evaluate_classifier(ds, "preds", "ground_truth", attribute_field="color", run_key="ev")
    assert ev.run_key == "ev"
    assert 0 <= ev.worst_group_accuracy <= ev.accuracy <= 1
    assert ev.accuracy == pytest.approx(np.mean(
        [p == t for p, t in zip(ds.values("preds.label"), ds.values("ground_truth.label"))]))


def test_every_writer_returns_a_result_with_its_run_key():
    for name in ("audit_balance", "compute_sa_features", "compute_pseudo_labels", "compute_hardness_tags",
                 "compute_captions", "filter_captions", "generate_from_captions", "train_conditional_diffusion",
                 "generate_balanced", "filter_generated", "train_classifier", "apply_classifier",
                 "evaluate_classifier"):
        fn = getattr(fb, name)
        assert "run_key" in fn.__wrapped__.__code__.co_varnames, name  # claims.exclusive wraps every writer
        ret = fn.__wrapped__.__annotations__["return"]
        assert ret not in ("dict", "str", "None", dict, str, None), f"{name} returns {ret}"
