"""The process set-up every job shares: allocator policy and device claim."""
from __future__ import annotations

import torch

from adlib.settings import Settings
from adlib.training import resolve_device


def job_device(settings: Settings) -> torch.device:
    """Set this process up for a job and return its device.

    Large freed buffers are kept for reuse unless ``settings.keep_freed_memory`` is False (see
    :mod:`adlib.allocator`: a 3x faster CPU forward). ``settings.threads`` pins torch's thread
    count (results of some models depend on it, see docs/reliability.md). On a box with several
    GPUs the process claims a free one (a file lock held until the process ends, see
    :mod:`adlib.devices`); elsewhere that is a no-op.
    """
    from adlib.allocator import reuse_freed_memory
    from adlib.devices import acquire_device

    if settings.keep_freed_memory:
        reuse_freed_memory()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return resolve_device(acquire_device(settings.device).device)
