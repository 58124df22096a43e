"""eoir-batch on a real ``dask.distributed.LocalCluster`` (2 worker processes, 1 thread each): a
corrupt file isolated, a worker killed mid-run, the driver killed and the batch resumed.

Dask is the ``batch`` extra (requirements-dev.txt pins it; Slicer 5.8's stack does not ship it)."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import distributed  # a dependency of the package: no skip
import psutil  # comes with distributed
import pytest
from test_batch import FAST, summary, write_cohort

from EOIRRegistrationLib.cli import batch, batch_pair
from EOIRRegistrationLib.cli.batch_manifest import completed_report, read_manifest, resume_key
from EOIRRegistrationLib.engine.options import RegistrationOptions

ENGINE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"
OPTIONS = RegistrationOptions(initial_alignment="none", network=False, refine_iterations=1,
                              preset="fast", threads=1)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as dask_client:
        yield dask_client


def run(pairs, out, client):
    keys = {p.id: resume_key(p, OPTIONS, False) for p in pairs}
    return {r["id"]: r for r in batch.run_pairs(pairs, out, OPTIONS, False, keys, client)}


def test_a_corrupt_file_fails_its_pair_only_and_each_worker_loads_the_model_once(tmp_path, client):
    ids = write_cohort(tmp_path / "data", 4, labels=False)
    (tmp_path / "data" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with open(tmp_path / "data" / "manifest.csv", "a") as f:
        f.write("bad,f0.nii.gz,corrupt.nii.gz\n")
    pairs = read_manifest(tmp_path / "data" / "manifest.csv")
    client.run(batch_pair.cached_model.cache_clear)
    rows = run(pairs, tmp_path / "out", client)
    assert {i: rows[i]["status"] for i in ids} == dict.fromkeys(ids, "registered")
    assert rows["bad"]["status"] == "failed" and "corrupt.nii.gz" in rows["bad"]["error"]
    for i in ids:
        assert completed_report(tmp_path / "out" / i, resume_key(
            next(p for p in pairs if p.id == i), OPTIONS, False)) is not None
    loads = client.run(lambda: batch_pair.cached_model.cache_info().misses)
    assert sorted(loads.values()) in ([1, 1], [0, 1])  # once per worker that ran a pair


def test_a_worker_killed_mid_run_has_its_pair_rerun_and_the_batch_completes(tmp_path, client):
    ids = write_cohort(tmp_path / "data", 4, labels=False)
    pairs = read_manifest(tmp_path / "data" / "manifest.csv")
    killed = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy:
                worker, keys = next(iter(busy.items()))
                pid = client.run(os.getpid, workers=[worker])[worker]
                killed.update(worker=worker, pid=pid, key=keys[0])
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    rows = run(pairs, tmp_path / "out", client)
    killer.join()
    assert killed, "no worker was busy"
    assert {i: rows[i]["status"] for i in ids} == dict.fromkeys(ids, "registered")
    assert killed["pid"] not in client.run(os.getpid).values()  # that process is gone
    pair_id = next(i for i in ids if f"eoir-pair-{i}-" in str(killed["key"]))
    report = json.loads((tmp_path / "out" / pair_id / "report.json").read_text())
    assert report["batch"]["id"] == pair_id


def test_a_killed_driver_resumes_with_only_the_missing_pairs(tmp_path):
    ids = write_cohort(tmp_path / "data", 5, labels=False)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "EOIRRegistrationLib", "batch",
               str(tmp_path / "data" / "manifest.csv"), "--output-dir", str(out),
               "--workers", "2", "--threads", "1", *FAST]
    env = {**os.environ, "PYTHONPATH": str(ENGINE_DIR)}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any((out / i / "report.json").exists() for i in ids):
        assert driver.poll() is None and time.monotonic() < deadline, "no pair finished"
        time.sleep(0.02)
    workers = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()
    driver.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)  # Dask's workers follow their parent
    assert not alive
    assert not (out / "batch_summary.csv").exists()
    pairs = read_manifest(tmp_path / "data" / "manifest.csv")
    options = RegistrationOptions(initial_alignment="none", network=False, refine_iterations=1,
                                  preset="fast")
    done = {p.id for p in pairs if completed_report(out / p.id, resume_key(p, options, True))}
    assert done and done != set(ids)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = summary(out)
    assert {i for i in ids if rows[i]["status"] == "reused"} == done
    assert {i for i in ids if rows[i]["status"] == "registered"} == set(ids) - done
    with open(out / "batch_summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(ids)


def test_the_jobqueue_example_of_docs_batch_md_makes_a_slurm_job(tmp_path):
    """The YAML and the script of docs/batch.md: dask-jobqueue reads the configuration and
    writes a job of 8 one-thread workers on 8 cores; the script's arguments are eoir-batch's."""
    import re

    import dask
    import yaml
    jobqueue = pytest.importorskip("dask_jobqueue", reason="the cluster example's dependency")
    text = (ENGINE_DIR.parent / "docs" / "batch.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    script = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    # as Dask merges a configuration file into its defaults
    flat = {f"jobqueue.slurm.{key}": value for key, value in config["jobqueue"]["slurm"].items()}
    with dask.config.set(flat), jobqueue.SLURMCluster(scheduler_options={
            "dashboard_address": ":0"}) as cluster:
        job = cluster.job_script()
    assert "#SBATCH --cpus-per-task=8" in job and "#SBATCH -p normal" in job
    assert "--nthreads 1 " in job and "--nworkers 8 " in job
    assert "source ~/venvs/eoir/bin/activate" in job
    call = re.search(r"main\((\[.*?\])\)\)", script, re.S).group(1)
    argv = eval(call, {"manifest": "c.csv", "output_dir": "out",  # noqa: S307 - our own docs
                       "cluster": type("C", (), {"scheduler_address": "tcp://head:8786"})})
    args = batch.parser().parse_args(argv)
    assert args.scheduler == "tcp://head:8786" and args.threads == 1
