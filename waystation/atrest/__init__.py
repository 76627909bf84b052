"""Encryption at rest, the parts shared by the agent's and the server's LMDB stores.

`rewrite` re-encrypts an environment's values in place, resumably (turning encryption
on or off, or moving a store to a new data key); `sentinel` marks a store whose
encryption is being changed, so that nothing else opens it half-way.
"""
