"""The Jobs API path (ribray/remote.py and the submit/status/logs/stop/doctor commands) against a
real Ray head with token authentication, started for this module and stopped without touching
any other Ray instance on the machine; plus the token order, the submission plan and the
cluster/ manifests."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from typer.testing import CliRunner

from conftest import ROOT, write_job
from ribray.cli import app
from ribray.config import JobFileError, load_job
from ribray.remote import Remote, RemoteError, plan_submission, resolve_token
from ribray.store import open_store

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(res, code: int, *needles: str, alone: bool = True) -> str:
    """The single ``error:`` line of a failed command: all of its stderr when ``alone``, else
    the last line after progress lines."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == code, res.output
    if not alone:
        assert sum(ln.startswith("error: ") for ln in lines) == 1, res.output
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- a head of our own ------------------------------------------------------------------------


def head_processes(pgid: int, temp_dir: str) -> list[psutil.Process]:
    """Processes of the test head only: those in the session ``ray start`` was started in,
    those naming its private temp dir, and all their descendants (workers call setsid)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid or temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_head(pgid: int, temp_dir: str) -> None:
    """SIGTERM, then SIGKILL after 3 s, to the head's processes; never ``ray stop``, which
    ends every Ray instance of this user on the machine (the test session's own included)."""
    procs = head_processes(pgid, temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def head():
    """A Ray head (2 CPUs, dashboard on 127.0.0.1, token auth with a random token) in its own
    session and temp dir, on free ports; stopped process by process at the end."""
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: unix socket paths
    ports = {name: free_port() for name in ("gcs", "dash", "client", "agent", "metrics")}
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RIBRAY_SUBMISSION_ID")}
    env.update({"RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token",
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}:{env.get('PATH', '')}"})
    cmd = [f"{bin_dir}/ray", "start", "--head", f"--port={ports['gcs']}",
           f"--dashboard-port={ports['dash']}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
           "--include-dashboard=true", f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}",
           f"--metrics-export-port={ports['metrics']}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed below
    starter = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    pgid = starter.pid
    address = f"http://127.0.0.1:{ports['dash']}"
    try:
        if starter.wait(timeout=90) != 0:
            pytest.fail(f"ray start failed: {(Path(temp_dir) / 'ray-start.log').read_text()}")
        deadline = time.monotonic() + 60
        while True:
            try:
                r = requests.get(f"{address}/api/jobs/", timeout=5,
                                 headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the test head's Jobs API did not come up within 60 s")
            time.sleep(0.5)
        yield {"address": address, "token": token, "env": {"RAY_AUTH_TOKEN": token},
               "gcs": f"127.0.0.1:{ports['gcs']}"}
    finally:
        stop_head(pgid, temp_dir)
        log.close()
        assert not head_processes(pgid, temp_dir), "the test head left processes behind"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, small_transformer_ckpt, tmp_path_factory):
    """A small job submitted with --follow: (result, job id, store)."""
    d = tmp_path_factory.mktemp("remote")
    job_file = write_job(d / "job.yaml", **{"name": "remote-modadd",
                                            "model.path": str(small_transformer_ckpt),
                                            "out": str(d / "store.zarr")})
    res = runner.invoke(app, ["submit", str(job_file), "--address", head["address"], "--follow"],
                        env=head["env"])
    job_id = res.stdout.splitlines()[0] if res.stdout else ""
    return res, job_id, d / "store.zarr"


def test_submit_follow_writes_the_store(submitted, head):
    res, job_id, store = submitted
    assert res.exit_code == 0, res.output
    assert job_id.startswith("ribray-remote-modadd-") and len(job_id.rsplit("-", 1)[1]) == 8
    assert res.stdout.strip().splitlines()[-1] == f"job {job_id}: SUCCEEDED"
    attrs = dict(open_store(store).attrs)
    assert attrs["status"] == "complete"
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"],
                                 headers={"Authorization": f"Bearer {head['token']}"})
    meta = client.get_job_info(job_id).metadata
    assert meta == {"ribray": "1", "name": "remote-modadd", "config_hash": attrs["config_hash"],
                    "store": str(store)}


def test_status_and_logs(submitted, head):
    _, job_id, store = submitted
    res = runner.invoke(app, ["status", "--address", head["address"]], env=head["env"])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.stdout.splitlines() if job_id in ln)
    assert "remote-modadd" in row and "SUCCEEDED" in row and str(store) in row
    res = runner.invoke(app, ["status", job_id, "--address", head["address"]], env=head["env"])
    assert res.exit_code == 0, res.output
    assert f"job {job_id}: SUCCEEDED" in res.stdout and "store status: complete" in res.stdout
    res = runner.invoke(app, ["logs", job_id, "--address", head["address"]], env=head["env"])
    assert res.exit_code == 0, res.output
    assert "remote-modadd: complete" in res.stdout and f"wrote {store}" in res.stdout


def test_failed_job_in_a_working_dir(head, tmp_path):
    """The job file travels in runtime_env.working_dir and its relative paths resolve there; a
    job that fails on the head ends FAILED: exit 1 and one line."""
    wd = tmp_path / "wd"
    wd.mkdir()
    write_job(wd / "job.yaml", **{"name": "fails", "model.path": "missing.pt",
                                  "out": str(tmp_path / "never.zarr"),
                                  "runtime_env": {"working_dir": str(wd)}})
    res = runner.invoke(app, ["submit", str(wd / "job.yaml"), "--address", head["address"],
                              "--follow"], env=head["env"])
    line = one_line(res, 1, "ended FAILED", "exit code 2", alone=False)
    assert line.endswith("exit code 2")
    assert "error: job.yaml: field model.path: missing.pt" in res.stdout  # the driver's log
    assert not (tmp_path / "never.zarr").exists()


def test_wrong_token_and_dead_address(head):
    res = runner.invoke(app, ["status", "--address", head["address"]],
                        env={"RAY_AUTH_TOKEN": "not-the-token"})
    one_line(res, 2, "authentication", "RAY_AUTH_TOKEN")
    dead = f"http://127.0.0.1:{free_port()}"
    res = runner.invoke(app, ["status", "--address", dead], env=head["env"])
    one_line(res, 2, "cannot reach", dead)
    res = runner.invoke(app, ["logs", "ribray-nope-00000000", "--address", head["address"]],
                        env=head["env"])
    one_line(res, 2, "no job ribray-nope-00000000")


def test_stop(head, small_transformer_ckpt, tmp_path):
    job_file = write_job(tmp_path / "job.yaml", **{"name": "to-stop",
                                                   "model.path": str(small_transformer_ckpt)})
    res = runner.invoke(app, ["submit", str(job_file), "--address", head["address"]],
                        env=head["env"])
    assert res.exit_code == 0, res.output
    job_id = res.stdout.strip()
    res = runner.invoke(app, ["stop", job_id, "--address", head["address"]], env=head["env"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"job {job_id}: STOPPED"


def test_doctor(head, tmp_path):
    res = runner.invoke(app, ["doctor", "--address", head["address"], "--store",
                              str(tmp_path / "new" / "s.zarr")], env=head["env"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["ok   address", "ok   token",
                                                  "ok   resources", "ok   store"]
    assert "2 CPUs, 0 GPUs" in lines[2]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = runner.invoke(app, ["doctor", "--address", head["address"], "--store",
                              str(blocker / "s.zarr")], env=head["env"])
    assert res.exit_code == 1, res.output
    assert res.stdout.strip().splitlines()[-1].startswith("FAIL store:")
    res = runner.invoke(app, ["doctor", "--address", head["address"]],
                        env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert res.exit_code == 1 and "FAIL token" in res.stdout and "403" in res.stdout


# --- without a head ---------------------------------------------------------------------------


def test_commands_need_a_dashboard_address():
    for args in (["status"], ["logs", "x"], ["stop", "x"]):
        res = runner.invoke(app, [*args, "--address", "10.0.0.1:6379"])
        one_line(res, 2, f"ribray {args[0]} talks to the Ray Jobs API", "http://HEAD:8265")
    res = runner.invoke(app, ["status"], env={"RAY_ADDRESS": None})
    one_line(res, 2, "--address")


def test_silent_address_times_out():
    """A port that accepts connections but never answers: one line naming the timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(RemoteError, match=r"no answer within 0.5 s") as info:
            Remote(address, timeout=0.5).version()
    assert "\n" not in str(info.value) and address in str(info.value)


def test_token_resolution_order(tmp_path):
    """Ray's order: RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH (no fallback when it is bad), else
    ~/.ray/auth_token; whitespace stripped."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("home-token\n")
    named = tmp_path / "tok"
    named.write_text("  file-token \n")
    both = {"RAY_AUTH_TOKEN": " env-token ", "RAY_AUTH_TOKEN_PATH": str(named)}
    assert resolve_token(both, home) == "env-token"
    assert resolve_token({"RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": str(named)},
                         home) == "file-token"
    assert resolve_token({}, home) == "home-token"
    assert resolve_token({}, tmp_path / "nobody") is None
    with pytest.raises(RemoteError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_submission_plan(tmp_path, small_transformer_ckpt):
    (tmp_path / "jobs").mkdir()
    job_file = write_job(tmp_path / "jobs" / "j.yaml", **{
        "name": "my job/1", "model.path": "ck.pt", "out": "results/j.zarr",
        "runtime_env": {"working_dir": ".", "env_vars": {"HF_HOME": "/data/hf"}}})
    job = load_job(job_file)
    plan = plan_submission(Path("jobs/j.yaml"), job, None, True, cwd=tmp_path)
    assert plan.entrypoint == ("ribray submit jobs/j.yaml --out results/j.zarr --overwrite "
                               "--no-dashboard")
    assert plan.submission_id.startswith("ribray-my-job-1-")
    assert plan.runtime_env["working_dir"] == str(tmp_path.resolve())
    assert plan.runtime_env["excludes"][:2] == [".git", ".venv"]
    assert plan.runtime_env["env_vars"] == {"HF_HOME": "/data/hf",
                                            "RIBRAY_SUBMISSION_ID": plan.submission_id}
    assert "pip" not in plan.runtime_env
    assert plan.metadata["config_hash"] == job.model_copy(
        update={"out": "results/j.zarr"}).fingerprint()
    # without a working_dir: absolute paths of this machine, no upload
    bare = job.model_copy(update={"runtime_env": type(job.runtime_env)()})
    plan = plan_submission(Path("jobs/j.yaml"), bare, Path("elsewhere/s.zarr"), False,
                           cwd=tmp_path)
    assert plan.entrypoint.split()[2:5] == [str(job_file.resolve()), "--out",
                                            str(tmp_path / "elsewhere" / "s.zarr")]
    assert "working_dir" not in plan.runtime_env and plan.store.startswith("/")
    missing = job.model_copy(update={"runtime_env": type(job.runtime_env)(working_dir="nope")})
    with pytest.raises(RemoteError, match="runtime_env.working_dir"):
        plan_submission(Path("jobs/j.yaml"), missing, None, False, cwd=tmp_path)


def test_runtime_env_is_validated_and_not_hashed(tmp_path):
    base = {"model.path": "ck.pt"}
    plain = load_job(write_job(tmp_path / "a.yaml", **base))
    shipped = load_job(write_job(tmp_path / "b.yaml", **base, **{
        "runtime_env": {"working_dir": ".", "pip": ["numpy"]}}))
    assert plain.fingerprint() == shipped.fingerprint()
    # the hash of a job without the field is what it was before the field existed
    old = plain.model_dump(exclude={"runtime_env"})
    assert plain.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()
                                                 ).hexdigest()
    with pytest.raises(JobFileError, match="runtime_env.colour"):
        load_job(write_job(tmp_path / "c.yaml", **base, **{"runtime_env": {"colour": 1}}))
    with pytest.raises(JobFileError, match="RAY_ADDRESS"):
        load_job(write_job(tmp_path / "d.yaml", **base, **{
            "runtime_env": {"env_vars": {"RAY_ADDRESS": "x"}}}))


def test_cluster_manifests_parse():
    import jsonschema
    import ray.autoscaler

    cfg = yaml.safe_load((ROOT / "cluster" / "gpu-cluster.yaml").read_text())
    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"  # what `ray up` checks
    jsonschema.validate(cfg, json.loads(schema.read_text()))
    assert cfg["provider"]["type"] == "aws"
    head_type = cfg["head_node_type"]
    assert head_type in cfg["available_node_types"]
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert any("ribray" in c for c in cfg["setup_commands"])
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text()))
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert "ribray submit jobs/gpt2.yaml" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head_env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in head_env if e["name"] == "RAY_AUTH_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert any(e["name"] == "RAY_AUTH_TOKEN" for e in worker["env"])
