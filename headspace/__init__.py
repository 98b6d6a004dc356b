"""headspace: long-context LLM inference on a GPU with little memory.

One call loads a model, one object runs it::

    model, tokenizer = headspace.load_model("smollm2-135m")
    engine = headspace.Engine(model, tokenizer, mode="offload", gpu_heads=1)
    result = engine.generate(headspace.passkey_prompt(), max_new_tokens=8)

Learned eviction keeps a fixed budget of tokens per KV head, chosen by retaining heads::

    engine = headspace.Engine(model, tokenizer, mode="locret", compression=8)
"""

from headspace.budget import budget_cache
from headspace.cache import HeadspaceCache, offload_cache
from headspace.engine import MODES, Engine, Generation, Mode, Stats, register_mode
from headspace.errors import HeadspaceError
from headspace.memory import MemoryPlan, plan
from headspace.models import PRESETS, load_model
from headspace.prompts import passkey_prompt
from headspace.retaining import RetainingHeads, TrainConfig, train_retaining_heads

__all__ = [
    "MODES",
    "PRESETS",
    "RetainingHeads",
    "TrainConfig",
    "Engine",
    "Generation",
    "HeadspaceCache",
    "HeadspaceError",
    "MemoryPlan",
    "Mode",
    "Stats",
    "budget_cache",
    "load_model",
    "offload_cache",
    "passkey_prompt",
    "plan",
    "register_mode",
    "train_retaining_heads",
]
