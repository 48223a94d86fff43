"""Run every benchmark with the settings quoted in the README, one after another (``make bench``).

Each benchmark prints its own table and ratios against its in-process
baseline. ``requery`` is left out unless asked for: its first run builds the
WordNet gloss cache of the CLIP model (about 44 min on a 2-core CPU). So is
``scale``, the 1,000,000-sample figures (about 1 h on a shared 2-core CPU,
~6 GB of RAM and ~3 GB of MongoDB disk).
Usage: python benchmarks/run_all.py [--only balance debias ...] [--with-requery] [--with-scale]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

BENCHMARKS = {
    "writeback": ["bench_writeback.py"],
    "panel": ["bench_panel.py"],
    "xmeans": ["bench_sa.py", "xmeans", "--n", "22000"],
    "embed": ["bench_sa.py", "embed", "--images", "120"],
    "t2i": ["bench_t2i.py"],
    "captions": ["bench_captions.py", "--repeats", "5", "--threads", "1"],  # per-caption random streams
    "repair": ["bench_repair.py"],  # real Colored MNIST, 1% and 5%, 3 seeds (~1 h on 2 CPU cores)
    "balance": ["bench_balance.py"],  # its defaults are the README settings
    "discovery": ["bench_discovery.py"],  # 24 planted slices on real MNIST digits (~30 min on 2 CPU cores)
    "requery": ["bench_sa.py", "requery", "--n", "100000"],
    "scale": ["bench_scale.py", "--n", "1000000"],  # 1M samples: panel, X-means, write-back, re-query
}
OPT_IN = {"requery", "scale"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    ap.add_argument("--with-requery", action="store_true")
    ap.add_argument("--with-scale", action="store_true")
    args = ap.parse_args()
    opted = {n for n in OPT_IN if getattr(args, f"with_{n}")}
    names = args.only or [n for n in BENCHMARKS if n not in OPT_IN or n in opted]
    failed = []
    for name in names:
        cmd = [sys.executable, os.path.join(HERE, BENCHMARKS[name][0]), *BENCHMARKS[name][1:]]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
