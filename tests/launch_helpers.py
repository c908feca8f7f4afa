"""Functions that local worker processes import by name (spawned processes cannot run a test's closures)."""
import time

from t2i.errors import T2IError


def rank_one_fails(stop=None) -> None:
    """Rank 1 fails at once; rank 0 hangs, as a rank waiting in a collective for its dead peer would."""
    import os

    if os.environ["RANK"] == "1":
        raise T2IError("rank 1 failed")
    time.sleep(300)
