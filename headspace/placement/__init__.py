"""Where KV lives, and how much of it a machine holds.

* :mod:`.arithmetic` - a :class:`Placement` (resident heads per layer, the rest in host RAM)
  and the bytes it puts in each tier; :func:`plan` for a given one, :func:`budget_bytes` for
  a budgeted (eviction) cache.
* :mod:`.peak` - the model of what a run needs on the device besides its KV.
* :mod:`.machine` - the device memory left after the weights, and host RAM.
* :mod:`.planner` - the automatic plan (fill the device, then host RAM), the check
  that refuses what does not fit, and the largest context a machine holds.
"""

from headspace.placement.arithmetic import Placement, auto_group_heads, budget_bytes, plan
from headspace.placement.machine import Machine, check_host_ram, memory_shortfall, probe
from headspace.placement.peak import WorkingSet, working_set
from headspace.placement.planner import check_full, device_room, fill, largest_context, place, propose

__all__ = [
    "Machine",
    "Placement",
    "WorkingSet",
    "auto_group_heads",
    "budget_bytes",
    "check_full",
    "check_host_ram",
    "memory_shortfall",
    "device_room",
    "fill",
    "largest_context",
    "place",
    "plan",
    "probe",
    "propose",
    "working_set",
]
