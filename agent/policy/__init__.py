"""The device's sync policy: WHEN the link may be used, and for what.

Pure logic (`windows`, `limits`, `decide`, `answers`) decides; thin adapters
(`probes`) ask the device whether its link is metered and how its battery is;
`agent.policy.gate` puts them together for the daemon. See docs/agent-api.md
("Sync policy") and the operator guide.
"""

from agent.policy.decide import LANES, Battery, Conditions, Decision, Deferral, Rules, decide
from agent.policy.errors import PolicyError
from agent.policy.limits import DailyBudget, TokenBucket
from agent.policy.windows import Window, is_open, parse_window, seconds_until_change

__all__ = ["LANES", "Battery", "Conditions", "DailyBudget", "Decision", "Deferral",
           "PolicyError", "Rules", "TokenBucket", "Window", "decide", "is_open",
           "parse_window", "seconds_until_change"]
