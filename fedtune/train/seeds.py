"""Seeds of a round: without DP reproducible from the run seed, with DP never reused.

Training without DP draws its batches from :func:`round_seed`, so a run is
reproducible from its seed. A DP release draws from the OS (``secrets``) unless the
simulation-only ``seeded-noise`` asks for :func:`release_seed`, one seed per release
(run nonce and input hash), so no two releases ever share noise.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["release_seed", "round_seed"]


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed of its own for each (run seed, round, client): training without DP."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def release_seed(seed: int, run_nonce: str, input_digest: str) -> int:
    """``seeded-noise`` simulations only: a seed per release, never shared by two."""
    digest = hashlib.sha256(f"{seed}/{run_nonce}/{input_digest}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
