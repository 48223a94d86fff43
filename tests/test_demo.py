import fiftyone as fo

from fairbalance import demo


def test_demo_runs_end_to_end(capsys):
    try:
        assert demo.main(["--name", "fb-demo-test", "--train-per-class", "20", "--test-per-class", "5"]) == 0
        out = capsys.readouterr().out
        assert "== train: 200 samples, 10 bias-conflicting" in out
        assert "ground_truth x color:" in out and "entropy" in out
    finally:
        if fo.dataset_exists("fb-demo-test"):
            fo.delete_dataset("fb-demo-test")
