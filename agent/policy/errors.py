"""The policy package's one error: a policy setting that cannot be understood.

    PolicyError (ValueError)
"""

from __future__ import annotations


class PolicyError(ValueError):
    """A sync window, probe or limit that is written wrong; the message says how to
    write it."""


__all__ = ["PolicyError"]
