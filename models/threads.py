"""Apply core.threads' count to torch in this process (the rule itself is torch-free, in core/threads.py)."""

from __future__ import annotations

import torch


def use_threads(count: int) -> None:
    """Let torch's CPU operators in this process use `count` threads (called just before computing)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
