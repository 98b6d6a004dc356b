"""headspace: long-context LLM inference on a GPU with little memory.

One call loads a model, one object runs it::

    model, tokenizer = headspace.load_model("smollm2-135m")
    engine = headspace.Engine(model, tokenizer, mode="offload")  # gpu_heads="auto": fill the GPU first
    result = engine.generate(headspace.passkey_prompt(), max_new_tokens=8)

Prefill a long document once and ask it many questions; save it and load it back::

    document = engine.prefill_document(open("report.txt").read())
    answer = engine.ask(document, "\nWho signed it?")
    engine.save(document, "report.hsc")
    document = engine.load("report.hsc")

Store KV in fewer bits, per tier (both, or only the heads offloaded to host RAM)::

    engine = headspace.Engine(model, tokenizer, mode="offload", kv_dtype="host=int4")

Learned eviction keeps a fixed budget of tokens per KV head, chosen by retaining heads::

    engine = headspace.Engine(model, tokenizer, mode="locret", compression=8)
"""

from headspace.documents.document import Document
from headspace.documents.files import DocumentFile
from headspace.documents.store import DocumentStore
from headspace.engine.engine import Engine
from headspace.engine.modes import MODES, Mode, register_mode
from headspace.engine.sampling import SamplingParams
from headspace.engine.stats import Generation, Stats
from headspace.errors import HeadspaceError
from headspace.eviction.budget import BudgetOptions, budget_cache
from headspace.eviction.policies import POLICIES, Policy, ScoreInputs, register_policy
from headspace.eviction.retaining.heads import RetainingHeads
from headspace.eviction.retaining.train import TrainConfig, train_retaining_heads
from headspace.kv.cache import HeadspaceCache, OffloadOptions, offload_cache
from headspace.kv.layers import Phase
from headspace.kv.quant.precision import KVPrecision
from headspace.kv.quant.schemes import SCHEMES, Scheme
from headspace.models import PRESETS, load_model
from headspace.placement import Placement, largest_context, plan, probe
from headspace.prompts import passkey_prompt
from headspace.shape import ModelShape

__all__ = [
    "MODES",
    "POLICIES",
    "PRESETS",
    "SCHEMES",
    "BudgetOptions",
    "Document",
    "DocumentFile",
    "DocumentStore",
    "Engine",
    "Generation",
    "HeadspaceCache",
    "HeadspaceError",
    "KVPrecision",
    "Mode",
    "ModelShape",
    "OffloadOptions",
    "Phase",
    "Placement",
    "Policy",
    "RetainingHeads",
    "SamplingParams",
    "Scheme",
    "ScoreInputs",
    "Stats",
    "TrainConfig",
    "budget_cache",
    "largest_context",
    "load_model",
    "offload_cache",
    "passkey_prompt",
    "plan",
    "probe",
    "register_mode",
    "register_policy",
    "train_retaining_heads",
]
