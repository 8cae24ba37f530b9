"""GPU slot claims (adlib.devices): real file locks between real processes; no GPU needed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adlib import devices
from adlib.devices import DeviceClaimError, acquire_device, claim_device

# A worker process: claims a GPU, prints the claim, holds it until its release file appears.
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from adlib.devices import claim_device
    release = Path(sys.argv[1])
    with claim_device("auto", poll_interval=0.05) as claim:
        print(claim.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"), claim.how, flush=True)
        while not release.exists():
            time.sleep(0.05)
""")

_CLEARED = ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", devices.ENV_CLAIMED, devices.ENV_GPUS,
            devices.ENV_LOCK_DIR)


@pytest.fixture
def gpu_env(tmp_path, monkeypatch):
    """Two pretend GPUs and a private lock directory, for this process and its children."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(devices.ENV_GPUS, "2")
    monkeypatch.setenv(devices.ENV_LOCK_DIR, str(tmp_path / "locks"))
    return tmp_path


class Worker:
    def __init__(self, tmp: Path, name: str):
        self.release_file = tmp / f"release-{name}"
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(self.release_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def claim_line(self, timeout: float = 30.0) -> list[str]:
        """The worker's "gpu visible how" line; fails if it does not come within ``timeout``."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"worker printed no claim within {timeout} s")
        line = self.proc.stdout.readline()
        assert line, f"worker exited without a claim: {self.proc.stderr.read()}"
        return line.split()

    def has_claimed_within(self, seconds: float) -> bool:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        return bool(sel.select(seconds))

    def release(self) -> None:
        self.release_file.touch()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def workers(gpu_env):
    started: list[Worker] = []

    def start(name: str) -> Worker:
        started.append(Worker(gpu_env, name))
        return started[-1]

    yield start
    for w in started:
        w.kill()


def test_two_processes_get_different_gpus_and_a_third_waits_for_a_release(workers):
    a, b = workers("a"), workers("b")
    gpu_a, visible_a, how_a = a.claim_line()
    gpu_b, visible_b, how_b = b.claim_line()
    assert {gpu_a, gpu_b} == {"0", "1"}
    assert (visible_a, visible_b) == (gpu_a, gpu_b)  # CUDA_VISIBLE_DEVICES narrowed to the claim
    assert how_a == how_b == "claimed"

    c = workers("c")
    assert not c.has_claimed_within(1.5), "a third claim must wait while both GPUs are held"
    a.release()
    gpu_c, visible_c, _ = c.claim_line()
    assert gpu_c == visible_c == gpu_a
    b.release()
    c.release()


def test_a_killed_process_leaves_no_stale_claim(workers):
    a, b = workers("a"), workers("b")
    gpu_of_a, gpu_of_b = a.claim_line()[0], b.claim_line()[0]
    assert {gpu_of_a, gpu_of_b} == {"0", "1"}
    lock_of_a = Path(os.environ[devices.ENV_LOCK_DIR]) / f"gpu{gpu_of_a}.lock"
    assert lock_of_a.read_text().startswith(f"pid={a.proc.pid} ")
    a.kill()  # SIGKILL: no exit handler runs; only the kernel drops the flock
    assert lock_of_a.exists()
    c = workers("c")
    assert c.claim_line(timeout=10)[0] == gpu_of_a
    b.release()
    c.release()


def test_claim_sets_and_restores_the_environment_and_is_reentrant(gpu_env):
    with claim_device("auto", timeout=5) as claim:
        assert claim.how == "claimed" and claim.device == "cuda"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == claim.gpu == "0"
        assert claim.lock_path.read_text().startswith(f"pid={os.getpid()} ")
        with claim_device("cuda") as inner:  # nested claim (e.g. evaluate inside train)
            assert inner.how == "inherited" and inner.gpu == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # inner exit does not release
        second = acquire_device("auto", timeout=5)  # a second process-level claim, as a child would
        assert second.how == "inherited"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and devices.ENV_CLAIMED not in os.environ
    with claim_device("auto", timeout=5) as again:  # the released GPU is free again
        assert again.gpu == "0"


def test_timeout_names_the_holders(gpu_env, monkeypatch):
    monkeypatch.setenv(devices.ENV_GPUS, "1")
    with claim_device("auto", timeout=5) as claim:
        # behave like an unrelated process; not monkeypatch, whose undo would re-set the variable
        # after the claim has restored the environment and leak it into later tests
        del os.environ[devices.ENV_CLAIMED]
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceClaimError, match=rf"gpu 0 held by pid={os.getpid()} .*--resources gpu=N"):
                acquire_device("auto", timeout=0.3, poll_interval=0.05)
            assert time.monotonic() - t0 < 5
        finally:
            os.environ[devices.ENV_CLAIMED] = claim.gpu
    assert devices.ENV_CLAIMED not in os.environ


@pytest.mark.parametrize("env, device, how, expected_device", [
    ({}, "cpu", "requested", "cpu"),
    ({}, "cuda:1", "requested", "cuda:1"),
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "3"}, "auto", "scheduler", "auto"),
    ({devices.ENV_GPUS: "0"}, "auto", "no-gpu", "auto"),
    ({devices.ENV_GPUS: "", "CUDA_VISIBLE_DEVICES": "0"}, "auto", "no-gpu", "auto"),
])
def test_no_claim_cases_leave_everything_alone(gpu_env, monkeypatch, env, device, how, expected_device):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with claim_device(device) as claim:
        assert (claim.how, claim.device, claim.gpu) == (how, expected_device, None)
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    assert not any((gpu_env / "locks").glob("*.lock"))


def test_gpu_lists_are_parsed_without_cuda(gpu_env, monkeypatch):
    assert devices.parse_gpu_list("3") == ["0", "1", "2"]
    assert devices.parse_gpu_list("1,3") == ["1", "3"]
    assert devices.parse_gpu_list("2", "CUDA_VISIBLE_DEVICES") == ["2"]
    assert devices.parse_gpu_list("-1", "CUDA_VISIBLE_DEVICES") == []
    with pytest.raises(DeviceClaimError, match="ADLIB_GPUS='two'.*ADLIB_GPUS=4"):
        monkeypatch.setenv(devices.ENV_GPUS, "two")
        devices.available_gpus()
    monkeypatch.delenv(devices.ENV_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert devices.available_gpus() == ["2", "5"] and devices.count_gpus() == 2
    smi = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1f2e)\n"
           "  MIG 3g.40gb     Device  0: (UUID: MIG-aa)\n"
           "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-3c4d)\n")
    assert devices.parse_nvidia_smi_list(smi) == ["0", "1"]


def test_claims_pick_from_a_visible_device_list(gpu_env, monkeypatch):
    monkeypatch.delenv(devices.ENV_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with claim_device("auto", timeout=5) as claim:
        assert claim.gpu == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"
