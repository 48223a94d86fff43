import ast
import re
from collections import Counter

import fiftyone as fo

from fairbalance.ops import demo
from fairbalance.datasets.colored_digits import nearest_color


def test_demo_runs_end_to_end(capsys):
    try:
        assert demo.main(["--name", "fb-demo-test", "--train-per-class", "20", "--test-per-class", "5",
                          "--epochs", "2", "--balance-epochs", "1", "--balance-per-class", "10",
                          "--balance-total", "10"]) == 0
        out = capsys.readouterr().out
        assert "== train: 200 samples, 10 bias-conflicting" in out
        assert "ground_truth x color:" in out and "entropy" in out
        assert "skipped:" in out and "ViT-B-32/openai" in out  # no CLIP weights offline: said, not hidden
        tagged = int(re.search(r"== Hardness: tagged (\d+) samples 'bias_conflicting' \(the biased model's errors\)",
                               out).group(1))
        ds = fo.load_dataset("fb-demo-test")
        assert tagged == len(ds.match_tags("bias_conflicting")) > 0
        for method in ("vanilla", "jtt", "lff"):
            assert f"{method:<7} test accuracy" in out
            assert ds.count(f"{method}_predictions") == 50
        assert "== Repair: 'fb-demo-test-imbalanced', 50 training images" in out
        assert "conditions: the 'color' labels" in out and "generated 10 images" in out
        repaired = fo.load_dataset("fb-demo-test-imbalanced")
        shown = ast.literal_eval(out.split("(nearest palette colour of the strokes): ")[1].splitlines()[0])
        assert shown == dict(Counter(nearest_color(p) for p in repaired.match_tags("generated").values("filepath")))
        assert re.search(r"real -> real \+ generated: \d\.\d{3} -> \d\.\d{3} \(max ln 5", out)
        assert len(repaired.match_tags("generated")) == 10 and repaired.has_run("generate_balanced")
    finally:
        for name in ("fb-demo-test", "fb-demo-test-imbalanced"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


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
