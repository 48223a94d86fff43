"""Issue #24, items 11 and 12: every size has a ceiling checked before planning, and every bad input is one clear
FairBalanceError raised before anything is written (the CLI maps it to exit 2)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fairbalance
from fairbalance.core import config, validation
from fairbalance.generate import generation
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)
NAN = float("nan")


@pytest.fixture(scope="module")
def colors():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-faults-inputs", num_classes=3, train_per_class=8, test_per_class=2,
                                 persistent=False, overwrite=True)
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def model(colors, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("faults-diff") / "model")
    fairbalance.train_conditional_diffusion(colors, "color", output_dir=folder, epochs=1, run_key="fi_diff", **TINY)
    return folder


def _state(ds, folders=()):
    """What a refused call must leave as it was: samples (a real count), fields, runs, values, files."""
    ds.reload()
    files = sorted(p for f in folders for p in glob.glob(os.path.join(f, "**"), recursive=True))
    return (ds.count("id"), sorted(ds.get_field_schema()), sorted(ds.list_runs()),
            sorted(ds.distinct("tags")), files)


def _corrupt_copy(src, dst, pattern):
    """A copy of a model folder with every file matching ``pattern`` truncated to garbage."""
    shutil.copytree(src, dst)
    hits = [p for p in glob.glob(os.path.join(dst, "**", pattern), recursive=True) if os.path.isfile(p)]
    assert hits, pattern
    for p in hits:
        with open(p, "wb") as f:
            f.write(b"\x80garbage{")
    return dst


# Each case: (id, call(ctx), text the message must hold). ctx: colors, model, tmp, clip (a tiny CLIP name).
CASES = [
    ("xmeans-empty", lambda c: fairbalance.xmeans(np.zeros((0, 3))), "empty|no row|at least"),
    ("xmeans-nan", lambda c: fairbalance.xmeans(np.full((10, 2), NAN)), "NaN"),
    ("xmeans-1d", lambda c: fairbalance.xmeans(np.arange(10.0)), "2-D"),
    ("xmeans-kmax0", lambda c: fairbalance.xmeans(np.random.rand(10, 2), kmax=0), "kmax"),
    ("device-cuda", lambda c: fairbalance.train_conditional_diffusion(c.colors, "color", device="cuda:7", epochs=1,
                                                                      run_key="x", **TINY), "CUDA"),
    ("device-bogus", lambda c: fairbalance.train_conditional_diffusion(c.colors, "color", device="bogus", epochs=1,
                                                                       run_key="x", **TINY), "device"),
    ("device-bogus-generate", lambda c: fairbalance.generate_balanced(c.colors, "color", model=c.model, per_class=1,
                                                                      device="bogus", output_dir=c.out), "device"),
    ("seed-nan-diffusion", lambda c: fairbalance.train_conditional_diffusion(c.colors, "color", seed=NAN, epochs=1,
                                                                             run_key="x", **TINY), "seed"),
    ("seed-nan-generate", lambda c: fairbalance.generate_balanced(c.colors, "color", model=c.model, per_class=1,
                                                                  seed=NAN, output_dir=c.out), "seed"),
    ("seed-nan-classifier", lambda c: fairbalance.train_classifier(c.colors, "ground_truth", seed=NAN, epochs=1,
                                                                   output_dir=c.out), "seed"),
    ("image-size-negative", lambda c: fairbalance.train_conditional_diffusion(
        c.colors, "color", epochs=1, run_key="x", **{**TINY, "image_size": -16}), "image_size"),
    ("block-out-channels-empty", lambda c: fairbalance.train_conditional_diffusion(
        c.colors, "color", epochs=1, run_key="x", **{**TINY, "block_out_channels": ()}), "block_out_channels"),
    ("layers-per-block-0", lambda c: fairbalance.train_conditional_diffusion(
        c.colors, "color", epochs=1, run_key="x", layers_per_block=0, **TINY), "layers_per_block"),
    ("batch-size-0-diffusion", lambda c: fairbalance.train_conditional_diffusion(
        c.colors, "color", epochs=1, run_key="x", **{**TINY, "batch_size": 0}), "batch_size"),
    ("batch-size-0-sa", lambda c: fairbalance.compute_sa_features(
        c.colors, related_texts_override=["a red digit", "a blue digit"], model=c.clip, pretrained=None,
        batch_size=0, device="cpu"), "batch_size"),
    ("batch-size-0-hardness", lambda c: fairbalance.compute_hardness_tags(
        c.colors, "ground_truth", batch_size=0, output_dir=c.out), "batch_size"),
    ("output-dir-is-a-file-diffusion", lambda c: fairbalance.train_conditional_diffusion(
        c.colors, "color", epochs=1, run_key="x", output_dir=c.file, **TINY), "is a file|Cannot create"),
    ("output-dir-is-a-file-generate", lambda c: fairbalance.generate_balanced(
        c.colors, "color", model=c.model, per_class=1, output_dir=c.file), "is a file|Cannot create"),
    ("output-dir-is-a-file-classifier", lambda c: fairbalance.train_classifier(
        c.colors, "ground_truth", epochs=1, output_dir=c.file), "is a file|Cannot create"),
    ("data-dir-unwritable", lambda c: c.with_data_dir(lambda: fairbalance.generate_balanced(
        c.colors, "color", model=c.model, per_class=1)), "FAIRBALANCE_DATA_DIR"),
    ("corrupt-clip", lambda c: fairbalance.compute_sa_features(
        c.colors, related_texts_override=["a red digit", "a blue digit"], model=c.corrupt_clip, pretrained=None,
        device="cpu"), "corrupt|could not be loaded"),
    ("corrupt-blip", lambda c: fairbalance.compute_captions(c.colors, model=c.corrupt_blip, device="cpu"),
     "corrupt|could not be loaded"),
    ("corrupt-lora-manifest", lambda c: fairbalance.generate_per_group(c.colors, adapters=c.corrupt_lora, per_group=1,
                                                                       output_dir=c.out), "corrupt"),
    ("corrupt-scheduler", lambda c: fairbalance.generate_balanced(
        c.colors, "color", model=c.corrupt_scheduler, per_class=1, output_dir=c.out), "corrupt|scheduler"),
    ("label-path-float-field", lambda c: fairbalance.balance_report(c.colors, "score"), "Classification"),
    ("label-path-float-field-export", lambda c: fairbalance.export_samples(c.colors, c.out, label_field="score"),
     "Classification"),
    ("audit-kmax-0", lambda c: fairbalance.audit_balance(
        c.colors, related_texts_override=["a red digit", "a blue digit"], model=c.clip, pretrained=None, kmax=0,
        features_field="fi_audit_sa", label_field="fi_audit_cluster", run_key="fi_audit"), "kmax"),
    ("tag-empty-hardness", lambda c: fairbalance.compute_hardness_tags(c.colors, "ground_truth", tag="",
                                                                       output_dir=c.out), "tag"),
    ("tag-blank-hardness", lambda c: fairbalance.compute_hardness_tags(c.colors, "ground_truth", tag=" ",
                                                                       output_dir=c.out), "tag"),
    ("tag-blank-filter", lambda c: fairbalance.filter_generated(c.colors, "color", tag=" "), "tag"),
    ("field-name-with-space", lambda c: fairbalance.compute_pseudo_labels(c.colors, "sa features", "my cluster"),
     "field name"),
    ("field-name-with-space-sa", lambda c: fairbalance.compute_sa_features(
        c.colors, related_texts_override=["a red digit", "a blue digit"], model=c.clip, pretrained=None,
        features_field="sa features", device="cpu"), "field name"),
    ("features-field-is-embeddings-field", lambda c: fairbalance.compute_sa_features(
        c.colors, related_texts_override=["a red digit", "a blue digit"], model=c.clip, pretrained=None,
        embeddings_field="both", features_field="both", device="cpu"), "embeddings_field"),
    ("nan-weights-export", lambda c: fairbalance.export_samples(c.colors, c.out, label_field="ground_truth",
                                                                weights_field="weight"), "weight"),
]


class _Ctx:
    def __init__(self, colors, model, tmp_path, clip, corrupt):
        self.colors, self.model, self.clip = colors, model, clip
        self.out = str(tmp_path / "out")
        self.file = str(tmp_path / "a_file")
        with open(self.file, "w") as f:
            f.write("a user's file\n")
        self.corrupt_clip, self.corrupt_blip, self.corrupt_scheduler = corrupt
        self.corrupt_lora = str(tmp_path / "adapters")  # a per-group adapters folder whose manifest is garbage
        os.makedirs(self.corrupt_lora)
        with open(os.path.join(self.corrupt_lora, "fairbalance_adapters.json"), "w") as f:
            f.write('{"complete": tru')

    def with_data_dir(self, call):
        before = os.environ.get("FAIRBALANCE_DATA_DIR")
        os.environ["FAIRBALANCE_DATA_DIR"] = os.path.join(self.file, "data")  # under a file: cannot be created
        try:
            return call()
        finally:
            os.environ["FAIRBALANCE_DATA_DIR"] = before


@pytest.fixture(scope="module")
def corrupt_models(model, tiny_clip, tmp_path_factory):
    import tiny_models

    root = tmp_path_factory.mktemp("corrupt")
    clip_dir = tiny_clip[len("local-dir:"):]
    clip = "local-dir:" + _corrupt_copy(clip_dir, str(root / "clip"), "*.bin")
    blip = _corrupt_copy(tiny_models.build_blip(str(root / "blip_src")), str(root / "blip"), "*.safetensors")
    sched = _corrupt_copy(model, str(root / "diff"), "scheduler_config.json")
    return clip, blip, sched


@pytest.fixture(scope="module")
def prepared(colors):
    """A float field (not a class), NaN weights on some samples."""
    import fiftyone as fo

    n = colors.count("id")
    colors.set_values("score", [0.5] * n)
    colors.set_values("weight", [NAN if i % 3 == 0 else 1.0 for i in range(n)])
    colors.add_sample_field("fi_dummy", fo.StringField)  # nothing else depends on it
    return colors


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,call,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_any_write(prepared, model, tiny_clip, corrupt_models, tmp_path,
                                                       name, call, message):
    ctx = _Ctx(prepared, model, tmp_path, tiny_clip, corrupt_models)
    folders = [ctx.out, os.path.dirname(model), config.data_dir()]
    before = _state(prepared, folders)
    with pytest.raises(FairBalanceError, match=f"(?i){message}"):
        call(ctx)
    assert _state(prepared, folders) == before
    assert not os.path.exists(os.path.join(ctx.out, generation.GENERATION_FILE))


def test_cli_maps_bad_input_to_exit_2(prepared):
    """fields.label_path's refusal reaches the CLI as exit 2 (usage), not 1 (gate failed) with a traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    prepared.persistent = True  # seen by the CLI's process
    try:
        proc = subprocess.run([sys.executable, "-m", "fairbalance", "check", prepared.name, "--field", "score",
                               "--max-imbalance-ratio", "2"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        prepared.persistent = False
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Classification" in proc.stderr


# ----------------------------------------------------------------------------- item 11: ceilings


def test_every_documented_ceiling_is_in_the_readme():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme.split("### Limits", 1)[1].split("\n## ", 1)[0]
    for name, limit in validation.LIMITS.items():
        assert f"`{name}`" in section and f"{limit:,}" in section, name


HUGE = [
    ("per_class", lambda c: fairbalance.generate_balanced(c.colors, "color", model=c.model, per_class=10**9,
                                                          output_dir=c.out)),
    ("total", lambda c: fairbalance.generate_balanced(c.colors, "color", model=c.model, total=10**9,
                                                      output_dir=c.out)),
    ("per_cell", lambda c: fairbalance.generate_balanced(c.colors, "color", model=c.model, mode="cells",
                                                         per_cell=10**9, output_dir=c.out)),
    ("per_group", lambda c: fairbalance.generate_per_group(c.colors, adapters=c.out, per_group=10**9)),
    ("ratio", lambda c: fairbalance.inject_bias_conflicting(c.colors, model=c.model, content_tag="c", ratio=1e8,
                                                            label_field="color")),
    ("images_per_caption", lambda c: fairbalance.generate_from_captions(c.colors, model=c.out,
                                                                        images_per_caption=10**9)),
    ("num_captions", lambda c: fairbalance.compute_captions(c.colors, model=c.out, num_captions=10**6)),
    ("epochs", lambda c: fairbalance.train_conditional_diffusion(c.colors, "color", run_key="x",
                                                                 **{**TINY, "epochs": 10**9})),
    ("num_shards", lambda c: fairbalance.queue_sharded(c.colors, "compute_sa_features", num_shards=10**4,
                                                       related_texts_override=["a red digit", "a blue digit"])),
]


@pytest.mark.parametrize("name,call", HUGE, ids=[h[0] for h in HUGE])
def test_huge_sizes_are_refused_before_planning(prepared, model, tmp_path, name, call):
    ctx = _Ctx(prepared, model, tmp_path, None, (None, None, None))
    before = _state(prepared, [ctx.out])
    with pytest.raises(FairBalanceError, match=f"{name}.*(limit|at most)"):
        call(ctx)
    assert _state(prepared, [ctx.out]) == before


def test_num_shards_at_most_the_number_of_samples(prepared):
    n = prepared.count("id")
    with pytest.raises(FairBalanceError, match="num_shards.*samples"):
        fairbalance.queue_sharded(prepared, "compute_sa_features", num_shards=n + 1,
                                  related_texts_override=["a red digit", "a blue digit"])


def test_operator_forms_have_the_library_ceilings():
    """Every integer/float field of the operator forms named in LIMITS carries the same max=."""
    import ast

    ops = os.path.join(os.path.dirname(os.path.dirname(__file__)), "operators")
    found = {}
    for path in glob.glob(os.path.join(ops, "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("int", "float")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in validation.LIMITS):
                kw = {k.arg: k.value for k in node.keywords}
                found.setdefault(node.args[0].value, []).append((os.path.basename(path), kw.get("max")))
    assert found, "no numeric form field found"
    for name, places in found.items():
        for where, mx in places:
            assert mx is not None, f"{where}: {name} has no max="
            src = ast.unparse(mx)
            assert "LIMITS" in src or float(ast.literal_eval(src)) == validation.LIMITS[name], (where, name, src)


def test_tmp_png_removed_when_the_disk_is_full(tmp_path):
    """A write that fails part-way (RLIMIT_FSIZE: the OS refuses to grow the file, as on a full disk) leaves no
    ``.tmp.png`` behind. A PNG smaller than Python's write buffer fails at close(), after PIL's own clean-up."""
    script = f"""
import os, resource, signal, sys
import numpy as np
sys.path[:0] = {sys.path!r}
from fairbalance.generate import generation
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out = {str(tmp_path)!r}
jobs = [generation.GenerationJob(os.path.join(out, "cluster0_seed0_00000.png"), "0", {{}}, {{}})]
noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)  # ~3 KB of PNG
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    generation.run_generation(jobs, None, lambda batch: [noise for _ in batch], {{}}, 4, progress=False)
except OSError as e:
    print("raised", type(e).__name__, e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert "raised" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_full_disk_while_saving_a_model_is_one_clear_error_and_leaves_no_temp_file(tmp_path):
    """Disk full at a checkpoint (#24 item 12): the write fails (RLIMIT_FSIZE makes the OS refuse to grow the file,
    as a full disk does); the user gets one ``FairBalanceError`` naming the folder and what to do, not torch's raw
    error, and no half-written temp file is left in the folder."""
    out = str(tmp_path / "clf")
    script = f"""
import os, resource, signal, sys
sys.path[:0] = {sys.path!r}
import fairbalance as fb
ds = fb.colored_digits("fb-disk-full", num_classes=3, train_per_class=8, test_per_class=2, persistent=True,
                       overwrite=True, output_dir={str(tmp_path / "data")!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
try:
    fb.train_classifier(ds, backbone="mlp", image_size=8, epochs=1, batch_size=64, output_dir={out!r})
    print("no error")
except fb.FairBalanceError as e:
    print("clear", type(e).__name__, "|", e)
finally:
    ds.delete()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ})
    assert "clear DiskWriteError" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    message = proc.stdout.split("|", 1)[1]
    assert out in message and "Free space" in message
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], os.listdir(out)
