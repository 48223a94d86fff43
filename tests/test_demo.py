import ast
import os
import re
from collections import Counter

import fiftyone as fo
import pytest

from fairbalance.core import models
from fairbalance.ops import demo
from fairbalance.datasets.colored_digits import nearest_color


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_end_to_end(capsys):
    have_clip = models.clip_problem("ViT-B-32", "openai") is None  # weights on disk or reachable: either way
    try:
        assert demo.main(["--name", "fb-demo-test", "--train-per-class", "20", "--test-per-class", "5",
                          "--epochs", "2", "--balance-epochs", "1", "--balance-per-class", "10",
                          "--balance-total", "10"]) == 0
        out = capsys.readouterr().out
        assert "== train: 200 samples, 10 bias-conflicting" in out
        assert "ground_truth x color:" in out and "entropy" in out
        assert "ViT-B-32/openai" in out
        if have_clip:  # the audit ran: related texts and X-means clusters, which the repair then conditions on
            assert "skipped:" not in out and "related text" in out and "sa_cluster x color:" in out
        else:  # no CLIP weights offline: said, not hidden
            assert "skipped:" in out and "related text" not in out
        tagged = int(re.search(r"== Hardness: tagged (\d+) samples 'bias_conflicting' \(the biased model's errors\)",
                               out).group(1))
        ds = fo.load_dataset("fb-demo-test")
        assert tagged == len(ds.match_tags("bias_conflicting")) > 0
        for method in ("vanilla", "jtt", "lff"):
            assert f"{method:<7} test accuracy" in out
            assert ds.count(f"{method}_predictions") == 50
        assert "== Repair: 'fb-demo-test-imbalanced', 50 training images" in out
        generated = int(re.search(r"generated (\d+) images", out).group(1))
        if have_clip:  # as many per X-means cluster: 10 // clusters each
            assert 0 < generated <= 10 and "conditions: the 'color' labels" not in out
        else:
            assert "conditions: the 'color' labels" in out and generated == 10
        repaired = fo.load_dataset("fb-demo-test-imbalanced")
        shown = ast.literal_eval(out.split("(nearest palette colour of the strokes): ")[1].splitlines()[0])
        assert shown == dict(Counter(nearest_color(p) for p in repaired.match_tags("generated").values("filepath")))
        assert re.search(r"real -> real \+ generated: \d\.\d{3} -> \d\.\d{3} \(max ln 5", out)
        assert len(repaired.match_tags("generated")) == generated and repaired.has_run("generate_balanced")
        # it ends by saying how to open the App on what it made, and what the Balance panel shows there
        tail = out[out.index("== Open it in the FiftyOne App"):]
        assert "fiftyone app launch fb-demo-test\n" in tail and "FIFTYONE_PLUGINS_DIR=" in tail
        # the folder FiftyOne searches for this checkout's fiftyone.yml (it printed a placeholder before)
        plugins = re.search(r"FIFTYONE_PLUGINS_DIR=(\S+)", tail).group(1)
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        assert plugins == os.path.dirname(checkout) and os.path.isfile(os.path.join(checkout, "fiftyone.yml"))
        assert "'fb-demo-test-imbalanced'" in tail and "Balance" in tail and "real + generated" in tail
        assert "== Cells repair" not in out  # the long repair only with --full
    finally:
        for name in ("fb-demo-test", "fb-demo-test-imbalanced"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_audit_with_local_clip(capsys, tiny_clip):
    try:
        assert demo.main(["--name", "fb-demo-clip", "--train-per-class", "10", "--test-per-class", "2",
                          "--epochs", "0", "--balance-epochs", "0", "--clip-model", tiny_clip,
                          "--clip-pretrained", ""]) == 0
        out = capsys.readouterr().out
        assert "related text" in out and "sa_cluster x color:" in out
        assert fo.load_dataset("fb-demo-clip").count("sa_cluster") == 120
    finally:
        if fo.dataset_exists("fb-demo-clip"):
            fo.delete_dataset("fb-demo-clip")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_full_runs_the_cells_repair_with_two_stage_training(capsys):
    """``make demo DEMO_ARGS=--full``: the README's cross-build repair row (Colored MNIST build a 1%: colour
    clusters, cells filled by editing real digits with inversion and the background kept, two-stage vs vanilla);
    here on 200 of its training images with tiny settings."""
    from fiftyone import ViewField as F

    from fairbalance.core import runs

    try:
        assert demo.main(["--full", "--name", "fb-demo-full", "--train-per-class", "10", "--test-per-class", "2",
                          "--epochs", "0", "--balance-epochs", "0", "--cells-limit", "200", "--cells-epochs", "1",
                          "--per-cell", "2", "--cells-steps", "2", "--cells-train-epochs", "1",
                          "--cells-channels", "16", "32", "32"]) == 0
        out = capsys.readouterr().out
        assert "== Cells repair (--full): 'fb-demo-full-mnist', Colored MNIST 1% conflicting" in out
        assert "200 training images" in out
        ds = fo.load_dataset("fb-demo-full-mnist")
        real = ds.match(F("sa_cluster").exists() & (F("generated") != True))  # noqa: E712  (the clustered subset)
        assert len(real) == 200 and len(ds.match_tags("test")) == 1000
        clusters = int(re.search(r"colour clusters \(X-means on the mean stroke colour\): (\d+)", out).group(1))
        assert clusters == len(real.distinct("sa_cluster.label")) >= 2
        gen = ds.match(F("generation.run_key") == "cells")
        majority = {}
        for c, col in zip(*real.values(["sa_cluster.label", "color.label"])):
            majority.setdefault(c, Counter())[col] += 1
        asked = [majority[c].most_common(1)[0][0] for c in gen.values("sa_cluster.label")]
        right = sum(a == nearest_color(p) for a, p in zip(asked, gen.values("filepath")))
        assert len(gen) > 0 and f"{len(gen)} images generated (every digit x cluster cell filled to 2" in out
        assert f"{right} of {len(gen)} (" in out and "README: 45.8% of 402 images" in out
        cfg = runs.get_run_config(ds, "cells")
        assert cfg.get("inversion") is True and cfg.get("keep_background") is True and cfg["per_cell"] == 2
        for name in ("vanilla", "two_stage"):
            assert re.search(rf"{name} +unbiased test accuracy +\d+\.\d%", out)
            assert ds.count(f"cells_{name}_predictions") == 1000
        assert runs.get_run_config(ds, "cells_two_stage_classifier")["train_config"]["method"] == "two_stage"
        assert runs.load_run_results(ds, "cells_two_stage_classifier")["num_generated_used"] == len(gen)
        assert "fiftyone app launch fb-demo-full" in out and "fb-demo-full-mnist" in out.split("== Open it")[1]
    finally:
        for name in ("fb-demo-full", "fb-demo-full-mnist"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)
