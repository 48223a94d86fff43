"""Colored Digits: does hardness find the bias-conflicting samples, and does debiasing help?

For each bias-conflicting ratio and seed:
1. ``compute_hardness``: GCE-biased classifier, top-K CE losses tagged; precision
   of the tags against ``bias_aligned == False`` vs. random tagging (= the ratio).
2. vanilla CE training vs. debiased training (JTT: upweight the tagged samples
   by lambda), both evaluated on the unbiased test split.
Prints mean +- std over seeds. Usage:
    python benchmarks/bench_debias.py [--ratios 0.01 0.05] [--seeds 0 1 2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import statistics
import time



from fairbalance import datasets
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.hardness import compute_hardness


def _fmt(xs):
    return f"{100 * statistics.mean(xs):5.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):4.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--backbone", default="mlp")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--biased-epochs", type=int, default=10)
    ap.add_argument("--upweight", type=float, default=50.0)
    ap.add_argument("--top-k", type=float, default=None, help="default: 2 x the true number of conflicting samples")
    args = ap.parse_args()

    common = dict(backbone=args.backbone, pretrained=False, image_size=32, batch_size=128, lr=1e-3)
    print(f"Colored Digits, {args.train_per_class}/class, backbone={args.backbone}, seeds={args.seeds}, "
          f"JTT lambda={args.upweight}")
    print(f"{'ratio':>6} | {'tag precision %':>15} | {'random %':>8} | {'vanilla test acc %':>18} | "
          f"{'debiased test acc %':>19} | {'vanilla conflicting %':>21} | {'debiased conflicting %':>22}")
    for ratio in args.ratios:
        prec, van, deb, van_c, deb_c = [], [], [], [], []
        for seed in args.seeds:
            t0 = time.time()
            ds = datasets.colored_digits("fb-bench-debias", train_per_class=args.train_per_class, test_per_class=100,
                                         conflict_ratio=ratio, seed=seed, persistent=False, overwrite=True)
            train, test = ds.match_tags("train"), ds.match_tags("test")
            n_conf = len(train.match({"bias_aligned": False}))
            k = int(args.top_k) if args.top_k else 2 * n_conf
            compute_hardness(train, top_k=k, epochs=args.biased_epochs, seed=seed, overwrite=True, **common)
            tagged = train.match_tags("bias_conflicting")
            prec.append(len(tagged.match({"bias_aligned": False})) / len(tagged))
            for name, extra, acc, acc_c in (("vanilla", {}, van, van_c),
                                            ("debiased", {"hard_tag": "bias_conflicting", "upweight": args.upweight},
                                             deb, deb_c)):
                clf = train_classifier(train, epochs=args.epochs, seed=seed, run_key=None, **common, **extra)
                apply_classifier(test, clf, f"pred_{name}")
                ev = evaluate_classifier(test, f"pred_{name}", aligned_field="bias_aligned")
                acc.append(ev.accuracy)
                acc_c.append(ev.conflicting_accuracy)
            ds.delete()
            print(f"  (ratio {ratio}, seed {seed}: {time.time() - t0:.0f} s)", flush=True)
        print(f"{100 * ratio:5.1f}% | {_fmt(prec):>15} | {100 * ratio:8.1f} | {_fmt(van):>18} | {_fmt(deb):>19} | "
              f"{_fmt(van_c):>21} | {_fmt(deb_c):>22}", flush=True)


if __name__ == "__main__":
    main()
