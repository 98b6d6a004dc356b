"""Locret at 8x with every needle's fact (key through value) forced kept in every layer and head."""
import json
import sys

import torch

sys.path.insert(0, 'benchmarks')
from locret_diagnose import answer_of, documents, token_spans

from headspace.engine.engine import Engine
from headspace.eviction import budget as B
from headspace.models import load_model

mode = sys.argv[1]  # "facts" | "none"
ratio = float(sys.argv[2])
fam = sys.argv[3]
ndocs = int(sys.argv[4])
length = int(sys.argv[5])
model, tok = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
FORCE = torch.tensor([], dtype=torch.long)
orig_evict = B.BudgetLayer.evict
def evict(self, k, v):
    if self.store.length <= self.budget:
        return
    # emulate: forced tokens get +inf scores (the stabilizer/sink masking uses the same route)
    hit = torch.isin(self.positions, FORCE.to(self.positions.device))
    self.scores = self.scores.masked_fill(hit, float("inf"))
    orig_evict(self, k, v)
    # restore the real scores of the kept tokens is not needed for the experiment (forced stay forced)
B.BudgetLayer.evict = evict
eng = Engine(model, tok, mode="locret", chunk_size=1024, keep_bytes=0, compression=ratio)
full = Engine(model, tok, mode="full", chunk_size=1024, keep_bytes=0)
rows = []
for d in documents(tok, fam, length, ndocs, 0):
    spans = [token_spans(tok, d.context, q)[2] for q in d.questions]
    wanted = sorted({i for s in spans for i in s}) if mode == "facts" else []
    FORCE = torch.tensor(wanted, dtype=torch.long)
    kept = eng.prefill_document(d.context)
    fk = full.prefill_document(d.context)
    for q in d.questions:
        a = answer_of(eng, d.context, q, kept)["score"]
        f = answer_of(full, d.context, q, fk)["score"]
        rows.append((q.depth, a, f))
    print(d.index, len(FORCE), sum(r[1] for r in rows), sum(r[2] for r in rows), len(rows), flush=True)
json.dump(rows, open(f"/tmp/force_{mode}_{fam}_{length}.json", "w"))
