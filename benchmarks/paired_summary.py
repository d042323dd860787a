#!/usr/bin/env python
"""Per-variant mean TRE per method (both seeds) and paired comparisons, from bench_varied.py results.

Usage::

    paired_summary.py RESULTS.jsonl [RESULTS.jsonl[:old=new,...] ...] [--methods a,b,...] [--pairs a:b,c:d]

Later files win for the same (case, method); ``:old=new`` renames a file's methods (e.g. the
default of an earlier run: ``bench_results/test_final/results.jsonl:default=default_cb30742``).
"""
import argparse
import collections
import json

import numpy as np

VARIANTS = ['iso1', 'iso2', 'thick', 'oblique', 'pose', 't1_t2', 't1_flair']
METHODS = 'default,default_40mm,yesterday,diffeomorphic,drn_io,elastix,syn'
PAIRS = ('default:default_40mm,default:yesterday,default:elastix,default:syn,diffeomorphic:default,'
         'drn_io:default_40mm,default:diffeomorphic')


def read(specs):
    rows = {}
    for spec in specs:
        path, _, renames = spec.partition(':')
        rename = dict(item.split('=', 1) for item in renames.split(',') if item)
        for line in open(path):
            r = json.loads(line)
            if 'tre' in r:
                method = rename.get(r['method'], r['method'])
                rows[(r['case'], method)] = r
    return rows


def paired(rows, a, b):
    cs = [c for (c, m) in rows if m == a and (c, b) in rows]
    A = [rows[(c, a)]['tre']['mean'] for c in cs]
    B = [rows[(c, b)]['tre']['mean'] for c in cs]
    D = [rows[(c, a)]['tre'].get('mean_dense') for c in cs]
    E = [rows[(c, b)]['tre'].get('mean_dense') for c in cs]
    return len(cs), np.mean(A), np.mean(B), np.mean(D), np.mean(E), sum(x < y for x, y in zip(A, B))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results', nargs='+')
    parser.add_argument('--methods', default=METHODS)
    parser.add_argument('--pairs', default=PAIRS)
    args = parser.parse_args()
    rows = read(args.results)
    methods = args.methods.split(',')
    print('variant', 'initial', *methods, sep=' | ')
    for v in VARIANTS:
        cells = []
        for m in methods:
            vals = [rows[(c, m)]['tre']['mean'] for c in (f'v300_{v}', f'v301_{v}') if (c, m) in rows]
            cells.append('/'.join(f'{x:.2f}' for x in vals))
        ini = [r['tre']['initial_mean'] for c in (f'v300_{v}', f'v301_{v}') for (cc, m), r in rows.items()
               if cc == c and m == methods[0]]
        print(v, '/'.join(f'{x:.2f}' for x in ini), *cells, sep=' | ')
    for pair in args.pairs.split(','):
        a, b = pair.split(':')
        n, ma, mb, da, db, w = paired(rows, a, b)
        if n:
            print(f'{a} vs {b}: n={n} mean {ma:.3f} vs {mb:.3f} ({100 * (ma / mb - 1):+.0f}%), '
                  f'dense {da:.3f} vs {db:.3f} ({100 * (da / db - 1):+.0f}%), {a} lower in {w}/{n}')
    worse = [(c, m) for (c, m), r in rows.items() if m in methods and r['tre']['worse_than_initial']]
    print('worse than initial:', worse)


if __name__ == '__main__':
    main()
