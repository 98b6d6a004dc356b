"""Locret at 8x (compress once) where evicted tokens are not dropped but merged, per KV head and block of G
positions, into one centroid key/value with a logit bonus log(count): the attention mass of what was evicted."""
import json
import sys

import torch

sys.path.insert(0, 'benchmarks')
from locret_diagnose import answer_of, documents

from headspace.engine.engine import Engine
from headspace.eviction import budget as B
from headspace.models import load_model

G = int(sys.argv[1])
fam = sys.argv[2]
ndocs = int(sys.argv[3])
length = int(sys.argv[4])
ratio = float(sys.argv[5])
policy = sys.argv[6] if len(sys.argv) > 6 else "locret"
model, tok = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
orig_evict, orig_attend, orig_attn = B.BudgetLayer.evict, B.BudgetLayer.attend, B.causal_attention
CUR = [None]

def evict(self, keys, values):
    before = self.positions
    orig_evict(self, keys, values)
    if G <= 0 or self.positions is before:
        return
    dropped = ~torch.stack([torch.isin(before[0, h], self.positions[0, h]) for h in range(before.shape[1])])[None]
    nblk = (self.settings.prompt_tokens + 4096) // G + 1
    if not hasattr(self, "cK"):
        b, h, _, d = keys.shape
        self.cK = torch.zeros(b, h, nblk, d)
        self.cV = torch.zeros(b, h, nblk, d)
        self.cN = torch.zeros(b, h, nblk)
    blk = (before // G).clamp_max(nblk - 1)
    w = dropped.float()
    self.cN.scatter_add_(-1, blk, w)
    idx = blk.unsqueeze(-1).expand_as(keys)
    self.cK.scatter_add_(2, idx, keys.float() * w[..., None])
    self.cV.scatter_add_(2, idx, values.float() * w[..., None])

def attend(self, query, scaling, staging, phase):
    CUR[0] = self
    try:
        return orig_attend(self, query, scaling, staging, phase)
    finally:
        CUR[0] = None

def attn(query, keys, values, scaling, window=None):
    layer = CUR[0]
    if layer is None or not hasattr(layer, "cN") or window is not None:
        return orig_attn(query, keys, values, scaling, window)
    b, hq, c, d = query.shape
    hk, L = keys.shape[1], keys.shape[2]
    used = layer.cN[0].sum(0) > 0  # blocks used by any head
    n = layer.cN[:, :, used]
    ck = layer.cK[:, :, used] / n.clamp_min(1)[..., None]
    cv = layer.cV[:, :, used] / n.clamp_min(1)[..., None]
    bonus = torch.where(n > 0, n.clamp_min(1).log(), torch.full_like(n, -float("inf")))
    q = query.float().reshape(b, hk, hq // hk * c, d)
    lg = q @ keys.float().transpose(-1, -2) * scaling
    qpos = torch.arange(L - c, L).repeat(hq // hk)[:, None]
    lg = lg.masked_fill(torch.arange(L)[None, :] > qpos, -float("inf"))
    lc = q @ ck.transpose(-1, -2) * scaling + bonus[:, :, None, :]
    p = torch.cat([lg, lc], -1).softmax(-1)
    out = p[..., :L] @ values.float() + p[..., L:] @ cv
    return out.reshape(b, hq, c, d).to(query.dtype)

B.BudgetLayer.evict, B.BudgetLayer.attend, B.causal_attention = evict, attend, attn
ONCE = (sys.argv[7] == "1") if len(sys.argv) > 7 else True
eng = Engine(model, tok, mode=policy, chunk_size=1024, keep_bytes=0, compression=ratio, once=ONCE)
rows = []
for d in documents(tok, fam, length, ndocs, 0):
    kept = eng.prefill_document(d.context)
    layers = [layer for layer in kept.cache.layers if hasattr(layer, "cN")]
    snap = [(layer.cK.clone(), layer.cV.clone(), layer.cN.clone()) for layer in layers]
    for q in d.questions:
        for layer, (a, b_, c_) in zip(layers, snap, strict=True):
            layer.cK, layer.cV, layer.cN = a.clone(), b_.clone(), c_.clone()
        rows.append((q.depth, answer_of(eng, d.context, q, kept)["score"]))
    print(d.index, sum(r[1] for r in rows), len(rows), flush=True)
json.dump(rows, open(f"/tmp/centroid_{policy}_{G}_{fam}_{length}_{ratio}_{int(ONCE)}.json", "w"))
