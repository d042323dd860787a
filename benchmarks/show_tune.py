#!/usr/bin/env python
"""Print the rows of a ``tune_varied.py`` results file: one line per case and configuration."""
import json
import sys

for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        t = r["tre"]
        print(f"{r['case']:15s} {r['config']:16s} mean {t['mean']:.3f} p95 {t['p95']:.3f} "
              f"dense {t.get('mean_dense', float('nan')):.3f} fold% {t['percent_folding']:.4f} "
              f"jmin {t['jacobian_min']:.3f} {r['seconds']:.0f} s")
