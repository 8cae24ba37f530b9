"""The SLURM profile against a real SLURM cluster (no mocks): every job is an sbatch job.

The tests marked `slurm` need a running cluster: `tools/slurm/ci_setup.sh` (root; installs slurm-wlm + munge when
missing and starts the one-node cluster of tools/slurm/local_cluster.sh). Without one every
test here is skipped with the reason. The cluster is found through SLURM_CONF, else the local
cluster's config (ADLIB_SLURM_DIR, default /tmp/adlib-slurm), else /etc/slurm/slurm.conf.
ADLIB_SLURM_TEST_DIR puts the test workflows on a file system the compute nodes share
(needed only on a multi-node cluster; the default is pytest's tmp_path).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "report", "envs")
INIT_WAIT = "5"  # seconds before the plugin's first status check (profile: 40)
LOCAL_CLUSTER = REPO / "tools" / "slurm" / "local_cluster.sh"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


# --------------------------------------------------------------------------------------- cluster
def _find_slurm_conf() -> Path | None:
    local = Path(os.environ.get("ADLIB_SLURM_DIR", "/tmp/adlib-slurm")) / "etc" / "slurm.conf"
    for candidate in (os.environ.get("SLURM_CONF"), local, "/etc/slurm/slurm.conf"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def cluster() -> dict:
    """Environment and facts (memory, GPUs) of a SLURM cluster that accepts jobs, else skip."""
    missing = [t for t in ("sinfo", "sbatch", "squeue", "srun", "scancel") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM client tools missing ({', '.join(missing)}): run tools/slurm/ci_setup.sh as root")
    conf = _find_slurm_conf()
    if conf is None:
        pytest.skip("no SLURM config found: start the local cluster with tools/slurm/local_cluster.sh start")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T|%m|%G|%c"], env=env, capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip(f"sinfo did not answer within 20 s (SLURM_CONF={conf}): is slurmctld running?")
    nodes = [line.split("|") for line in out.stdout.split() if line.count("|") == 3]
    usable = [n for n in nodes if n[0].rstrip("*~#").startswith(("idle", "mix", "alloc", "completing"))]
    if out.returncode != 0 or not usable:
        pytest.skip(f"SLURM cluster not up (SLURM_CONF={conf}): sinfo said {out.stdout.strip() or out.stderr.strip()!r};"
                    " start it with tools/slurm/local_cluster.sh start")
    return {"env": env, "conf": conf, "mem_mb": max(int(n[1]) for n in usable),
            "gpus": any("gpu" in n[2] for n in usable), "cpus": max(int(n[3]) for n in usable)}


@pytest.fixture
def workdir(tmp_path) -> Path:
    base = os.environ.get("ADLIB_SLURM_TEST_DIR")
    if not base:
        yield tmp_path
        return
    path = Path(base) / f"{tmp_path.name}-{os.getpid()}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_snakemake(args: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, float]:
    """Run Snakemake; on timeout kill it, cancel its SLURM jobs and fail (a hang is a bug)."""
    log = cwd / f"snakemake-{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([*SNAKEMAKE, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            text = log.read_text()
            ids = [m.group(2) for m in SUBMITTED.finditer(text)]
            if ids:
                subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=30)
            pytest.fail(f"snakemake did not finish within {timeout:.0f} s; log tail:\n{text[-3000:]}")
    return rc, log.read_text(), time.monotonic() - t0


def slurm_args(*extra: str) -> list[str]:
    return ["--workflow-profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", INIT_WAIT,
            "--jobs", "4", "--slurm-keep-successful-logs", *extra]


def submitted_jobs(log: str) -> dict[str, str]:
    """SLURM job id -> Snakemake rule, from the lines the plugin logs at each submission."""
    jobs = {}
    for match in SUBMITTED.finditer(log):
        rule = re.search(r"/rule_([^/]+)/", match.group(3))
        jobs[match.group(2)] = rule.group(1) if rule else "?"
    return jobs


def slurm_states(job_ids, env: dict) -> dict[str, str]:
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], env=env,
                         capture_output=True, text=True, timeout=30)
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def planned_jobs(cwd: Path, env: dict, extra: list[str]) -> dict[str, int]:
    """Rule -> number of jobs a dry run plans (Snakemake's "Job stats" table)."""
    out = subprocess.run([*SNAKEMAKE, "-n", "--quiet", "rules", *extra], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"dry run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    table = out.stdout.rsplit("Job stats:", 1)[-1].split("\ntotal", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)\s*$", table, re.MULTILINE)}


@pytest.mark.slurm
def test_local_cluster_start_is_idempotent_and_status_reports_up(cluster):
    local_conf = Path(os.environ.get("ADLIB_SLURM_DIR", "/tmp/adlib-slurm")) / "etc" / "slurm.conf"
    if cluster["conf"].resolve() != local_conf.resolve() or os.geteuid() != 0:
        pytest.skip("the cluster in use is not this machine's tools/slurm/local_cluster.sh cluster")
    t0 = time.monotonic()
    start = subprocess.run([str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0 and "already running" in start.stderr, start.stderr
    assert time.monotonic() - t0 < 10
    status = subprocess.run([str(LOCAL_CLUSTER), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "slurmd: running" in status.stdout, status.stdout
    env = subprocess.run([str(LOCAL_CLUSTER), "env"], capture_output=True, text=True, timeout=10)
    assert env.stdout.strip() == f"export SLURM_CONF={local_conf}"


# ---------------------------------------------------------------------------------- toy workflow
TOY = textwrap.dedent("""
    rule all:
        input: "c.txt"

    rule a:
        output: "a.txt"
        shell: "echo $SLURM_JOB_ID > {output}"

    rule b:
        input: "a.txt"
        output: "b.txt"
        resources: gpu=1
        shell: "cat {input} > {output}; echo $SLURM_JOB_ID gpus=${{CUDA_VISIBLE_DEVICES:-none}} >> {output}"

    rule c:
        input: "b.txt"
        output: "c.txt"
        shell: "cat {input} > {output}; echo $SLURM_JOB_ID >> {output}"
""")


@pytest.mark.slurm
def test_toy_workflow_runs_every_job_as_a_slurm_job(cluster, workdir):
    (workdir / "Snakefile").write_text(TOY)
    extra = [] if cluster["gpus"] else ["--set-resources", "b:gpu=0"]
    rc, log, seconds = run_snakemake(slurm_args(*extra), workdir, cluster["env"], timeout=300)
    assert rc == 0, log[-3000:]
    lines = (workdir / "c.txt").read_text().split("\n")
    job_ids = [lines[0].strip(), lines[1].split()[0], lines[2].strip()]
    assert all(j.isdigit() for j in job_ids) and len(set(job_ids)) == 3, lines
    assert submitted_jobs(log) == dict(zip(job_ids, ["a", "b", "c"]))
    assert set(slurm_states(job_ids, cluster["env"]).values()) == {"COMPLETED"}
    if cluster["gpus"]:  # --gpus=1 reached SLURM: it handed the job a GPU
        assert lines[1].split()[1] != "gpus=none", lines[1]
    print(f"toy workflow (3 SLURM jobs in sequence) took {seconds:.0f} s")


@pytest.mark.slurm
def test_a_failing_job_fails_the_workflow_and_is_retried(cluster, workdir):
    (workdir / "Snakefile").write_text(textwrap.dedent("""
        rule all:
            input: "ok.txt", "bad.txt"
        rule ok:
            output: "ok.txt"
            shell: "echo fine > {output}"
        rule bad:
            output: "bad.txt"
            shell: "echo failing on purpose >&2; exit 3"
    """))
    rc, log, seconds = run_snakemake(slurm_args("--retries", "1"), workdir, cluster["env"], timeout=300)
    assert rc != 0
    assert "SLURM-job" in log and "FAILED" in log, log[-3000:]
    jobs = submitted_jobs(log)
    assert sorted(jobs.values()) == ["bad", "bad", "ok"]  # one retry of the failing job
    assert (workdir / "ok.txt").read_text() == "fine\n"  # keep-going: independent work is kept
    assert not (workdir / "bad.txt").exists()
    print(f"failing workflow reported after {seconds:.0f} s")


# --------------------------------------------------------------------------------- real workflow
SMALL_CONFIG = {
    "img_size": 64,
    "seeds": [0],
    "pretrained": True,
    "datasets": [{"name": "synthetic", "layout": "synthetic", "categories": ["widget"],
                  "options": {"n_train": 8, "n_test_good": 6, "n_test_bad": 6, "size": 64}}],
    "models": [{"name": "padim", "overrides": {"backbone": "tf_efficientnet_lite0"}},
               {"name": "patchcore", "overrides": {"backbone": "tf_efficientnet_lite0"}},
               {"name": "dfm", "overrides": {"backbone": "tf_efficientnet_lite0"}}],
    "calibration": {"method": "calibration", "fraction": 0.25},
    "ensemble": {"top_k": 3},
    "report": {"bootstrap": 100},
}
# one thread per train/evaluate job so two run side by side on a 2-CPU node (same in both runs)
THREADS = ["--set-threads", "train=1", "evaluate=1", "evaluate_image_level=1"]
COMPARED = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pixel_aupro", "n_test", "n_normal",
            "n_anomalous", "thr_f1_percentile_threshold", "thr_roc_youden_threshold", "config_hash")


def _workflow_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    (dest / "config" / "config.yaml").write_text(yaml.safe_dump(SMALL_CONFIG, sort_keys=False))
    return dest


def _fit_resources(cluster: dict) -> list[str]:
    """Shrink the profile's memory and drop the GPU request when this cluster cannot meet them."""
    mem = min(16000, cluster["mem_mb"] // 2)
    gpu = [] if cluster["gpus"] else ["gpu=0"]
    sets = []
    for rule in ("train", "evaluate", "evaluate_image_level"):
        sets += [f"{rule}:mem_mb={mem}", f"{rule}:runtime=60"] + [f"{rule}:{g}" for g in gpu]
    sets += ["prepare:mem_mb=2000", "prepare:runtime=30"]
    return ["--set-resources", *sets]


@pytest.mark.slurm
@pytest.mark.slow
def test_small_real_workflow_on_slurm_matches_a_local_run(cluster, workdir):
    env = cluster["env"]
    on_slurm, local = _workflow_copy(workdir / "slurm"), _workflow_copy(workdir / "local")
    planned = planned_jobs(on_slurm, env, [])
    assert planned.get("train") == 3 and planned.get("prepare") == 1, planned

    # The SLURM run mostly waits for status polls: run the local reference at the same time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        slurm_run = pool.submit(run_snakemake, slurm_args(*THREADS, *_fit_resources(cluster)), on_slurm, env, 1200)
        local_run = pool.submit(run_snakemake, ["--cores", "2", *THREADS], local, env, 1200)
        (rc, log, seconds), (local_rc, local_log, local_seconds) = slurm_run.result(), local_run.result()
    assert rc == 0, log[-4000:]
    assert local_rc == 0, local_log[-4000:]
    assert not submitted_jobs(local_log)
    jobs = submitted_jobs(log)
    ran = {}
    for rule in jobs.values():
        ran[rule] = ran.get(rule, 0) + 1
    planned.pop("all", None)  # the target rule has no action and stays on the submit host
    assert ran == planned, f"SLURM jobs per rule {ran} != planned jobs {planned}"
    assert set(slurm_states(jobs, env).values()) == {"COMPLETED"}

    keys = ["dataset", "category", "model", "seed"]
    a = pd.read_csv(on_slurm / "results/aggregate/leaderboard.csv").sort_values(keys).reset_index(drop=True)
    b = pd.read_csv(local / "results/aggregate/leaderboard.csv").sort_values(keys).reset_index(drop=True)
    assert len(a) == 3 and a[keys].equals(b[keys])
    for column in COMPARED:
        if column not in a.columns:
            continue
        if pd.api.types.is_numeric_dtype(a[column]):
            pd.testing.assert_series_equal(a[column], b[column], check_exact=False, atol=1e-4, rtol=1e-4)
        else:
            assert a[column].equals(b[column]), column
    print(f"real workflow: {len(jobs)} SLURM jobs in {seconds:.0f} s; local run {local_seconds:.0f} s")


# ------------------------------------------------------------------- resources from benchmarks
def test_suggest_resources_reads_benchmark_tsvs_per_rule(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, seconds, rss in (("train/syn/widget/padim/0.tsv", 300.0, 2100.0),
                              ("train/syn/gear/padim/0.tsv", 900.0, 1900.0),
                              ("prepare/syn/widget/64.tsv", 2.0, 150.0)):
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t1\n")
    (tmp_path / "benchmarks" / "evaluate" / "x").mkdir(parents=True)
    (tmp_path / "benchmarks" / "evaluate" / "x" / "0.tsv").write_text(header + "0.1\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n")
    tool = REPO / "tools" / "slurm" / "suggest_resources.py"
    out = subprocess.run([sys.executable, str(tool), str(tmp_path / "benchmarks")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    suggested = yaml.safe_load(out.stdout)["set-resources"]
    assert suggested == {"prepare": {"mem_mb": 1000, "runtime": 10},
                         "train": {"mem_mb": 3500, "runtime": 30}}  # 2100*1.5 -> 3500; 900 s*2 -> 30 min
    missing = subprocess.run([sys.executable, str(tool), str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode != 0 and "is not a folder" in missing.stderr


def test_estimate_cost_extrapolates_measured_runs_to_the_grid(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    measured = {("train", "bottle", "padim"): 100.0, ("train", "cable", "padim"): 140.0,
                ("evaluate", "bottle", "padim"): 20.0, ("evaluate", "cable", "padim"): 40.0,
                ("train", "bottle", "stfpm"): 1800.0}  # stfpm never evaluated: not counted
    for (rule, category, model), seconds in measured.items():
        path = tmp_path / "benchmarks" / rule / "mvtec" / category / model / "0.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:00\t1000\t1\t1\t1\t0\t0\t0\t1\n")
    tool = REPO / "tools" / "slurm" / "estimate_cost.py"
    out = subprocess.run([sys.executable, str(tool), str(tmp_path / "benchmarks"), "--categories", "15"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    padim = next(line for line in out.stdout.splitlines() if line.startswith("| padim"))
    # mean train 120 s + mean evaluate 30 s = 150 s per run; x15 categories = 0.625 GPU-h
    assert [c.strip() for c in padim.strip("|").split("|")] == ["padim", "2", "120", "30", "0.042", "15", "0.6"]
    assert "stfpm" not in out.stdout and "**0.6**" in out.stdout
