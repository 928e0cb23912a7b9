"""CLIP-ViP inside other projects' tools: each module needs its own optional extra.

- :mod:`clipvip.integrations.mteb`: an MTEB model implementation (``pip install clipvip[mteb]``);
  docs/leaderboards.md.

Nothing here is imported by ``import clipvip``.
"""
