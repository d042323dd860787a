#!/usr/bin/env python
"""Per-variant mean TRE per method (both seeds) and paired comparisons, from a bench_varied.py results.jsonl."""
import collections
import json
import sys
rows={}
for l in open(sys.argv[1]):
    r=json.loads(l)
    if 'tre' in r: rows[(r['case'],r['method'])]=r
variants=['iso1','iso2','thick','oblique','pose','t1_t2','t1_flair']
methods=['default','default_40mm','yesterday','diffeomorphic','drn_io','elastix','syn']
print('variant', 'initial', *methods, sep=' | ')
tot=collections.defaultdict(list)
for v in variants:
    cells=[]
    for m in methods:
        vals=[rows[(c,m)]['tre']['mean'] for c in (f'v300_{v}',f'v301_{v}') if (c,m) in rows]
        cells.append('/'.join(f'{x:.2f}' for x in vals))
    ini=[rows[(c,'elastix')]['tre']['initial_mean'] for c in (f'v300_{v}',f'v301_{v}') if (c,'elastix') in rows]
    print(v, '/'.join(f'{x:.2f}' for x in ini), *cells, sep=' | ')
# paired means over cases where both exist
def paired(a,b):
    cs=[c for (c,m) in rows if m==a and (c,b) in rows]
    A=[rows[(c,a)]['tre']['mean'] for c in cs]; B=[rows[(c,b)]['tre']['mean'] for c in cs]
    D=[rows[(c,a)]['tre'].get('mean_dense') for c in cs]; E=[rows[(c,b)]['tre'].get('mean_dense') for c in cs]
    import numpy as np
    return len(cs), np.mean(A), np.mean(B), np.mean(D), np.mean(E), sum(x<y for x,y in zip(A,B))
for a,b in [('default','default_40mm'),('default','yesterday'),('default','elastix'),('default','syn'),('diffeomorphic','default'),('drn_io','default_40mm'),('default','diffeomorphic')]:
    n,ma,mb,da,db,w=paired(a,b)
    print(f'{a} vs {b}: n={n} mean {ma:.3f} vs {mb:.3f} ({100*(ma/mb-1):+.0f}%), dense {da:.3f} vs {db:.3f} ({100*(da/db-1):+.0f}%), {a} lower in {w}/{n}')
worse=[(c,m) for (c,m),r in rows.items() if r['tre']['worse_than_initial']]
print('worse than initial:', worse)
