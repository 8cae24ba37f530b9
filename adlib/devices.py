"""GPU slots on one multi-GPU box: each process claims one GPU through a file lock.

Snakemake's ``--resources gpu=N`` limits how many GPU jobs run at once but does not say which
GPU each job gets. A job claims a free GPU here: one lock file per GPU (``gpu<id>.lock`` in
the lock directory), taken with a non-blocking ``flock`` in order; the first free one wins and
``CUDA_VISIBLE_DEVICES`` is narrowed to it, so inside the process the GPU is ``cuda`` (index 0).
The kernel drops a flock when its process ends, however it ends, so a killed job never leaves
a stale claim. Claims must happen before torch initialises CUDA (before the first
``torch.cuda.is_available()``), because CUDA reads ``CUDA_VISIBLE_DEVICES`` only then.

No claim is made (the requested device is returned unchanged) when the device is ``cpu`` or an
explicit ``cuda:N``, inside a SLURM job (SLURM assigns GPUs itself), when a parent process
already claimed (``ADLIB_GPU_CLAIMED``), or when the box has no GPUs.

Environment: ``ADLIB_GPUS`` (a count ``N`` or a list of ids ``0,2,3``; overrides detection),
``ADLIB_GPU_LOCK_DIR`` (default ``<tmp>/adlib-gpu-locks``), ``ADLIB_GPU_CLAIM_TIMEOUT``
(seconds to wait for a free GPU, default 43200).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ENV_GPUS = "ADLIB_GPUS"
ENV_LOCK_DIR = "ADLIB_GPU_LOCK_DIR"
ENV_TIMEOUT = "ADLIB_GPU_CLAIM_TIMEOUT"
ENV_CLAIMED = "ADLIB_GPU_CLAIMED"
DEFAULT_TIMEOUT_S = 12 * 3600.0
_WAIT_LOG_EVERY_S = 60.0

log = logging.getLogger(__name__)


class DeviceClaimError(RuntimeError):
    """A GPU could not be claimed (bad setting, CUDA already initialised, or none free in time)."""


@dataclasses.dataclass
class DeviceClaim:
    """The outcome of a claim: the torch device string to use and the GPU held, if any.

    ``how`` is one of ``claimed`` (this claim holds a lock), ``inherited`` (a parent or outer
    claim holds it), ``scheduler`` (SLURM assigned devices), ``requested`` (cpu or an explicit
    ``cuda:N``) or ``no-gpu`` (the box has none).
    """

    device: str
    gpu: str | None = None
    lock_path: Path | None = None
    how: str = "no-gpu"
    _fd: int | None = dataclasses.field(default=None, repr=False)
    _saved_env: dict[str, str | None] = dataclasses.field(default_factory=dict, repr=False)

    def release(self) -> None:
        """Drop the lock and restore the environment; a no-op for claims that hold nothing."""
        if self._fd is None:
            return
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def parse_gpu_list(value: str, source: str = ENV_GPUS) -> list[str]:
    """GPU ids from a list such as ``"0,2,3"`` (ids or UUIDs); for ``ADLIB_GPUS`` a plain
    count ``"N"`` means ids 0..N-1. Empty (or ``-1``, or a count of 0) means no GPU."""
    value = value.strip()
    if not value or value == "-1":
        return []
    if value.isdigit() and "," not in value and source == ENV_GPUS:
        return [str(i) for i in range(int(value))]
    ids = [part.strip() for part in value.split(",")]
    if any(not re.fullmatch(r"\d+|(GPU|MIG)-[A-Za-z0-9_./:-]+", i) for i in ids):
        raise DeviceClaimError(
            f"{source}={value!r} is not a GPU count or a comma-separated list of GPU indices "
            f"or UUIDs (examples: {source}=4, {source}=0,2,3, {source}=GPU-1f2e...)")
    return ids


def parse_nvidia_smi_list(text: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` output (lines ``GPU 0: NAME (UUID: ...)``)."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, flags=re.MULTILINE)]


def available_gpus() -> list[str]:
    """The GPUs this process may claim, found without initialising CUDA.

    ``ADLIB_GPUS`` when set, else the entries of ``CUDA_VISIBLE_DEVICES`` when set, else the
    GPUs ``nvidia-smi -L`` lists, else none.
    """
    if ENV_GPUS in os.environ:
        return parse_gpu_list(os.environ[ENV_GPUS])
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return parse_gpu_list(os.environ["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi_list(out.stdout) if out.returncode == 0 else []


def count_gpus() -> int:
    """How many GPUs :func:`available_gpus` finds (0 means run on the CPU)."""
    return len(available_gpus())


def default_lock_dir() -> Path:
    return Path(os.environ.get(ENV_LOCK_DIR) or Path(tempfile.gettempdir()) / "adlib-gpu-locks")


def acquire_device(device: str = "auto", *, lock_dir: str | os.PathLike | None = None,
                   timeout: float | None = None, poll_interval: float = 0.5) -> DeviceClaim:
    """Claim a free GPU for this process when ``device`` is ``auto`` or ``cuda``.

    Tries each GPU's lock without blocking, in order, and polls every ``poll_interval``
    seconds until one is free or ``timeout`` seconds (default ``ADLIB_GPU_CLAIM_TIMEOUT`` or
    12 h) have passed, then raises :class:`DeviceClaimError` naming the holders. Call
    ``release()`` when done, or use :func:`claim_device`.
    """
    device = str(device)
    if device not in ("auto", "cuda"):
        return DeviceClaim(device=device, how="requested")
    if os.environ.get(ENV_CLAIMED):
        return DeviceClaim(device="cuda", gpu=os.environ[ENV_CLAIMED], how="inherited")
    if os.environ.get("SLURM_JOB_ID"):
        return DeviceClaim(device=device, how="scheduler")
    gpus = available_gpus()
    if not gpus:
        return DeviceClaim(device=device, how="no-gpu")
    _check_cuda_not_initialised()
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_lock_dir(lock_dir)
    if timeout is None:
        timeout = float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    start = last_log = time.monotonic()
    while True:
        for gpu in gpus:
            claim = _try_lock(lock_dir, gpu)
            if claim is not None:
                return claim
        now = time.monotonic()
        if now - start >= timeout:
            raise DeviceClaimError(
                f"no GPU free after {timeout:.0f} s: {_describe_holders(lock_dir, gpus)}. "
                f"Lower the number of parallel GPU jobs (snakemake --resources gpu=N with N <= "
                f"{len(gpus)}), end stuck processes, or raise {ENV_TIMEOUT}.")
        if now - last_log >= _WAIT_LOG_EVERY_S:
            log.info("waiting for a free GPU: %s", _describe_holders(lock_dir, gpus))
            last_log = now
        time.sleep(poll_interval)


@contextlib.contextmanager
def claim_device(device: str = "auto", *, lock_dir: str | os.PathLike | None = None,
                 timeout: float | None = None, poll_interval: float = 0.5) -> Iterator[DeviceClaim]:
    """Context manager around :func:`acquire_device`; releases the GPU on exit.

    Example: ``with claim_device(settings.device) as claim: device = resolve_device(claim.device)``.
    """
    claim = acquire_device(device, lock_dir=lock_dir, timeout=timeout, poll_interval=poll_interval)
    try:
        yield claim
    finally:
        claim.release()


def _try_lock(lock_dir: Path, gpu: str) -> DeviceClaim | None:
    path = lock_dir / f"gpu{gpu}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
             .encode())
    saved = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", ENV_CLAIMED)}
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ[ENV_CLAIMED] = gpu
    return DeviceClaim(device="cuda", gpu=gpu, lock_path=path, how="claimed", _fd=fd, _saved_env=saved)


def _describe_holders(lock_dir: Path, gpus: list[str]) -> str:
    parts = []
    for gpu in gpus:
        try:
            holder = (lock_dir / f"gpu{gpu}.lock").read_text().strip() or "unknown holder"
        except OSError:
            holder = "unknown holder"
        parts.append(f"gpu {gpu} held by {holder}")
    return "; ".join(parts)


def _make_lock_dir(lock_dir: Path) -> None:
    if lock_dir.exists():
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        lock_dir.chmod(0o1777)  # shared by every user's jobs on the box, like /tmp


def _check_cuda_not_initialised() -> None:
    # Best effort: an earlier torch.cuda.is_available() also fixes the GPUs, and leaves no trace.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise DeviceClaimError(
            "CUDA is already initialised in this process, so CUDA_VISIBLE_DEVICES can no longer "
            "choose the GPU: claim the device (adlib.devices.claim_device) before any CUDA call.")
