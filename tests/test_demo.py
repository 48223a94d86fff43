import fiftyone as fo

from fairbalance import demo


def test_demo_runs_end_to_end(capsys):
    try:
        assert demo.main(["--name", "fb-demo-test", "--train-per-class", "20", "--test-per-class", "5",
                          "--epochs", "2", "--balance-epochs", "1", "--balance-per-class", "10",
                          "--balance-total", "10"]) == 0
        out = capsys.readouterr().out
        assert "== train: 200 samples, 10 bias-conflicting" in out
        assert "ground_truth x color:" in out and "entropy" in out
        assert "skipped:" in out and "ViT-B-32/openai" in out  # no CLIP weights offline: said, not hidden
        assert "== Hardness: tagged 20 samples" in out
        assert "vanilla  test accuracy" in out and "debiased test accuracy" in out
        ds = fo.load_dataset("fb-demo-test")
        assert ds.count("vanilla_predictions") == ds.count("debiased_predictions") == 50
        assert "== Repair: 'fb-demo-test-imbalanced', 50 training images" in out
        assert "conditions: the 'color' labels" in out and "generated 10 images" in out
        before, after = map(float, out.split("counted by their condition): ")[1].split(" (")[0].split(" -> "))
        assert after > before  # 2 per colour added to 50 imbalanced images
        repaired = fo.load_dataset("fb-demo-test-imbalanced")
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
