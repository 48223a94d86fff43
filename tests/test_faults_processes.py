"""Issue #24, items 5 and 7, with real processes: mongod killed (-9) and restarted under a running process, and a
sharded job whose delegated worker is killed while it writes embeddings."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import fairbalance
from fairbalance.core import models, runs, sharding
from fairbalance.find import embeddings

FIFTYONE_CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone")
TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)


# ----------------------------------------------------------------------------- item 5: mongod crash


def _mongod_exe():
    import importlib.util

    spec = importlib.util.find_spec("fiftyone")
    exe = os.path.join(spec.submodule_search_locations[0], "db", "bin", "mongod")
    return exe if os.access(exe, os.X_OK) else shutil.which("mongod")


def _start_mongod(exe, dbpath, port, log):
    proc = subprocess.Popen([exe, "--dbpath", dbpath, "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--logpath", log, "--logappend"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, open(log).read()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise AssertionError("mongod did not start")


# One long-lived process (a notebook, the App server): generates, waits while mongod is killed and restarted,
# then reruns the same finished generation. Talks over stdin/stdout, one JSON line per step.
_CRASH_CHILD = r"""
import json, sys
import fiftyone as fo
import fairbalance
from fairbalance.core import claims
from fairbalance.datasets import colored_digits as datasets

model, out, fresh = sys.argv[1], sys.argv[2], sys.argv[3] == "fresh"
kw = dict(label_field="color", model=model, per_class=2, output_dir=out, seed=0, device="cpu")
if not fresh:
    ds = datasets.colored_digits("fb-crash", num_classes=3, train_per_class=8, test_per_class=2, persistent=True,
                                 overwrite=True)
    first = fairbalance.generate_balanced(ds, **kw)
    print("RESULT", json.dumps({"step": "generated", "added": first.num_added, "count": ds.count("id")}), flush=True)
    sys.stdin.readline()  # mongod is killed -9 and restarted on the same files meanwhile
ds = fo.load_dataset("fb-crash")
before = {"estimated": len(ds), "real": ds.count("id")}
try:
    again = fairbalance.generate_balanced(ds, **kw)
    outcome = {"added": again.num_added}
except claims.ClaimError as e:
    outcome = {"claim_error": str(e)}
paths = ds.values("filepath")
print("RESULT", json.dumps({"step": "rerun", "before": before, **outcome, "count": ds.count("id"),
                            "duplicates": len(paths) - len(set(paths))}), flush=True)
"""


def _result(child, log):
    """The child's next result line (FiftyOne logs to stdout too)."""
    for line in child.stdout:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(open(log).read()[-3000:])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_after_mongod_crash_adds_no_duplicate_and_is_not_blocked_by_its_own_claim(tmp_path):
    from fairbalance.datasets import colored_digits as datasets

    exe = _mongod_exe()
    if not exe:
        pytest.skip("no mongod binary")
    ref = datasets.colored_digits("fb-crash-ref", num_classes=3, train_per_class=8, test_per_class=2,
                                  persistent=False, overwrite=True)
    try:
        model = str(tmp_path / "model")
        fairbalance.train_conditional_diffusion(ref, "color", output_dir=model, epochs=1, run_key="crash_diff",
                                                **TINY)
    finally:
        ref.delete()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dbpath, log = str(tmp_path / "db"), str(tmp_path / "mongod.log")
    os.makedirs(dbpath)
    mongod = _start_mongod(exe, dbpath, port, log)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))
    env = {**os.environ, "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}",
           "FAIRBALANCE_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": os.pathsep.join([lib] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    def start(mode):
        return subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, model, str(tmp_path / "generated"), mode],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(tmp_path / f"child_{mode}.log", "w"), text=True)

    child = start("same")
    try:
        first = _result(child, tmp_path / "child_same.log")
        assert first["added"] == 6 and first["count"] == 36  # 30 real + 3 colors x 2
        mongod.kill()  # -9, right after the generation returned (and released its claims)
        mongod.wait()
        mongod = _start_mongod(exe, dbpath, port, log)  # the same files: MongoDB recovers from its journal
        child.stdin.write("go\n")
        child.stdin.flush()
        rerun = _result(child, tmp_path / "child_same.log")  # the same process, after the crash
        child.wait(120)
        child = start("fresh")  # and a new process
        fresh = _result(child, tmp_path / "child_fresh.log")
        child.wait(120)
    finally:
        if child.poll() is None:
            child.kill()
        mongod.terminate()
        mongod.wait(30)
    print("after the restart:", rerun, fresh)
    assert "claim_error" not in rerun, rerun  # its own released claim did not come back to block it
    for result in (rerun, fresh):  # the finished generation is found by a real count: nothing added twice
        assert result["before"]["real"] == 36, result
        assert result["added"] == 0 and result["count"] == 36 and result["duplicates"] == 0, result


# ----------------------------------------------------------------------------- item 7: sharded embeddings


def _worker(log_path):
    """A real ``fiftyone delegated launch`` process with this session's database, plugin and library."""
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.Popen([FIFTYONE_CLI, "delegated", "launch"], env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _failed(ds, run_key, allowed=()):
    status = fairbalance.sharded_status(ds, run_key)
    return [s for s in status["shards"] if s["operation_state"] == "failed" and s["operation"] not in allowed]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sharded_embeddings_survive_a_kill_between_values_and_tag_and_stale_schemas(digits_copy, tiny_clip,
                                                                                    tmp_path):
    """Two workers write the embeddings field at once (each loaded the dataset before the field existed: a stale
    schema); one is killed (-9) the moment the field first holds values. Re-queued, the job finishes, and the
    field keeps its model tag throughout: no shard fails "holds embeddings from an unknown model"."""
    ds = digits_copy
    view = ds.limit(80)  # 8 chunks of 10: enough for two workers to write at once
    run_key, field = "sharded", "emb_k"
    kw = dict(related_texts_override=["a red digit", "a green digit", "a blue digit"], model=tiny_clip,
              pretrained=None, device="cpu", num_workers=0, embeddings_field=field, features_field="sa_k",
              chunk_size=10, batch_size=10)
    fairbalance.queue_sharded(view, "compute_sa_features", num_shards=4, run_key=run_key, **kw)
    logs = [str(tmp_path / f"worker{i}.log") for i in range(3)]
    workers = [_worker(logs[0]), _worker(logs[1])]
    try:
        deadline, victim = time.time() + 600, None
        while time.time() < deadline and victim is None:  # the field's first values: kill the worker writing them
            ds.reload()
            if ds.has_field(field) and len(ds.exists(field).limit(1)):
                pids = {s.get("pid") for s in sharding.get_job(ds, run_key)["shards"].values()
                        if s["state"] == "running"}
                victim = next((w for w in workers if w.pid in pids), None)
            time.sleep(0.02)
        assert victim is not None, "no worker wrote embeddings"
        victim.kill()
        victim.wait()
        tag_at_kill = embeddings.stored_model(ds, field)
        assert tag_at_kill is not None, "values without the model tag"  # tagged before any value is written
        # queuing again (as a user does until the job is done): the killed worker's operation is failed and its
        # shard queued again (live ones are not); no other shard may fail
        workers.append(_worker(logs[2]))
        requeued, deadline, last = set(), time.time() + 600, 0.0
        while time.time() < deadline:
            status = fairbalance.sharded_status(ds, run_key)
            failed = _failed(ds, run_key, allowed=requeued)
            assert not failed, (failed, "\n".join(open(p).read()[-3000:] for p in logs))
            if status["merged"]:
                break
            if time.time() - last > 5:
                again = fairbalance.queue_sharded(view, "compute_sa_features", num_shards=4, run_key=run_key, **kw)
                requeued |= set(again.requeued.values())
                last = time.time()
            time.sleep(0.2)
        else:
            raise AssertionError(f"the job did not finish: {fairbalance.sharded_status(ds, run_key)}\n"
                                 + "\n".join(open(p).read()[-3000:] for p in logs))
    finally:
        for w in workers:
            _stop(w)
    ds.reload()
    clip = models.load_clip(tiny_clip, None, device="cpu")
    assert embeddings.stored_model(ds, field) == clip.spec.to_dict()  # the tag survived every writer
    assert len(ds.exists(field)) == len(ds.exists("sa_k")) == 80
    assert runs.get_run_config(ds, run_key)["num_shards"] == 4
    embeddings.check_field(ds, field, clip)  # a later run with the same model is accepted
