"""Shared by the examples: SYMDL_QUICK=1 (used by the tests) shortens training."""
import os

QUICK = os.environ.get("SYMDL_QUICK") == "1"


def epochs(full: int, quick: int = 2) -> int:
    return quick if QUICK else full
