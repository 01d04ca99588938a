"""ribray jobs on a Ray cluster through the Ray Jobs API (the dashboard's HTTP port).

* :func:`resolve_token` finds the cluster's token the way Ray does; every request carries it as
  ``Authorization: Bearer TOKEN``.
* :class:`Remote` wraps ``ray.job_submission.JobSubmissionClient`` for one dashboard address
  and turns unreachable addresses, timeouts and rejected tokens into :class:`RemoteError`, one
  line that says what to do.
* :func:`plan_submission` turns a job file into the Jobs API call: an entrypoint that runs
  ``ribray submit`` on the head (where Ray sets ``RAY_ADDRESS`` to the cluster's GCS address, so
  the driver connects directly), metadata, a submission id and the job's ``runtime_env``.
* :func:`doctor` checks an address, its token, its resources and a store path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from ribray.config import JobSpec
from ribray.location import is_url

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

TIMEOUT_S = 10.0
TOKEN_HINT = "set RAY_AUTH_TOKEN to the cluster's token (on the head: ~/.ray/auth_token)"
REACH_HINT = "is the head running and is the dashboard port right?"
# set in the job's environment by plan_submission: marks the driver that a submission started
SUBMISSION_ENV = "RIBRAY_SUBMISSION_ID"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RemoteError(RuntimeError):
    """A problem talking to the cluster, as one line that says what to do."""


def is_http(address: str | None) -> bool:
    """Whether ``address`` is a dashboard URL (Jobs API) rather than a GCS ``host:port``."""
    return bool(address) and address.lower().startswith(("http://", "https://"))


# --- the token -------------------------------------------------------------------------------


def resolve_token(environ: Mapping[str, str] | None = None, home: Path | None = None
                  ) -> str | None:
    """The cluster's token, found as Ray 2.60 finds it, or None.

    Ray's order (C++ ``ray::rpc::AuthenticationTokenLoader``, bound in
    ``ray/includes/rpc_token_authentication.pxi``; the default file is
    ``ray/_private/authentication/authentication_token_setup.py:_get_default_token_path``):
    env ``RAY_AUTH_TOKEN`` (stripped; empty counts as unset), else the file named by
    ``RAY_AUTH_TOKEN_PATH`` (which must then be readable and non-empty: Ray does not fall back),
    else ``~/.ray/auth_token``. Raises :class:`RemoteError` for a bad ``RAY_AUTH_TOKEN_PATH``.
    """
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = env.get("RAY_AUTH_TOKEN_PATH", "")
    if named:
        try:
            token = Path(named).expanduser().read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise RemoteError(f"RAY_AUTH_TOKEN_PATH is set but {named} cannot be read or is "
                              f"empty; {TOKEN_HINT}")
        return token
    default = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer TOKEN"}``, or no headers when no token is found."""
    token = resolve_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- errors as one line ----------------------------------------------------------------------


def _status_error(address: str, status: int) -> RemoteError | None:
    if status == 401:
        return RemoteError(f"{address}: authentication failed (401: no token was sent); "
                           f"{TOKEN_HINT}")
    if status == 403:
        return RemoteError(f"{address}: authentication failed (403: the token was rejected); "
                           f"{TOKEN_HINT}")
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def explain(address: str, exc: BaseException, job_id: str | None = None,
            timeout: float = TIMEOUT_S) -> RemoteError | None:
    """The one-line :class:`RemoteError` for a failed request, or None if ``exc`` is not one of
    the known kinds (unreachable, timeout, 401/403, unknown job)."""
    import aiohttp
    from ray.exceptions import AuthenticationError

    if isinstance(exc, RemoteError):
        return exc
    if isinstance(exc, (requests.Timeout, asyncio.TimeoutError, socket.timeout)):
        return RemoteError(f"cannot reach the Ray dashboard at {address}: no answer within "
                           f"{timeout:g} s; {REACH_HINT} (through an SSH tunnel: is it open?)")
    if isinstance(exc, AuthenticationError):
        return _status_error(address, 401 if "required" in str(exc).lower() else 403)
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return _status_error(address, exc.status) or RemoteError(
            f"{address}: log stream refused ({exc.status})")
    if isinstance(exc, (requests.ConnectionError, ConnectionError, aiohttp.ClientConnectionError)):
        return RemoteError(f"cannot reach the Ray dashboard at {address}: {REACH_HINT}")
    if job_id and isinstance(exc, RuntimeError) and "404" in str(exc):
        return RemoteError(f"{address}: no job {job_id} (ribray status lists the jobs)")
    return None


@contextlib.contextmanager
def one_line(address: str, job_id: str | None = None, timeout: float = TIMEOUT_S
             ) -> Iterator[None]:
    """Re-raise known request failures as :class:`RemoteError`; others pass through."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - translated or re-raised
        err = explain(address, exc, job_id, timeout)
        if err is None:
            raise
        raise err from None


# --- submission ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What :meth:`Remote.submit` sends: the Jobs API arguments and the store path."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    store: str


def submission_id(name: str) -> str:
    """``ribray-<name>-<8 hex>``, the name reduced to letters, digits, ``-`` and ``_``."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"ribray-{slug}-{secrets.token_hex(4)}"


def plan_submission(job_file: Path, job: JobSpec, out: str | Path | None, overwrite: bool,
                    cwd: Path | None = None) -> Submission:
    """The Jobs API call for a job file.

    Paths: with a local ``runtime_env.working_dir`` the job runs in its uploaded copy, so a job
    file inside it is passed relative to it and a relative store stays relative (it lands in
    that copy on the head: prefer an absolute path on a shared file system, or a URL). Without
    one, the job runs where the head was started, and both are passed as absolute paths of this
    machine. A store at a URL (``s3://...``) is passed as it is.
    Raises :class:`RemoteError` for a local ``working_dir`` that is not a folder.
    """
    cwd = cwd or Path.cwd()
    rt = job.runtime_env
    working_dir: str | None = None
    job_arg = str((cwd / job_file).resolve())
    if rt.working_dir and "://" in rt.working_dir:  # a remote package (s3://..., gs://...)
        working_dir = rt.working_dir
        job_arg = str(job_file) if not job_file.is_absolute() else job_arg
    elif rt.working_dir:
        wd = (cwd / rt.working_dir).resolve()
        if not wd.is_dir():
            raise RemoteError(f"{job_file}: field runtime_env.working_dir: {wd}: not a folder")
        working_dir = str(wd)
        with contextlib.suppress(ValueError):
            job_arg = Path(job_arg).relative_to(wd).as_posix()
    store = str(out) if out is not None else job.out
    if not is_url(store):
        store = str(Path(store)) if working_dir is not None or Path(store).is_absolute() \
            else str(cwd / store)
    sid = submission_id(job.name)
    args = ["ribray", "submit", job_arg, "--out", str(store)]
    args += ["--overwrite"] if overwrite else []
    args += ["--no-dashboard"]
    env: dict[str, Any] = {"env_vars": {**rt.env_vars, SUBMISSION_ENV: sid}}
    if working_dir is not None:
        env["working_dir"] = working_dir
        env["excludes"] = list(rt.excludes)
    if rt.pip:
        env["pip"] = list(rt.pip)
    # the driver records --out as config.out; the hash must cover the same string
    config_hash = job.model_copy(update={"out": str(store)}).fingerprint()
    meta = {"ribray": "1", "name": job.name, "config_hash": config_hash, "store": str(store)}
    return Submission(sid, shlex.join(args), env, meta, str(store))


# --- the client ------------------------------------------------------------------------------


class Remote:
    """The Jobs API of one dashboard address, with the token and one-line errors."""

    def __init__(self, address: str, timeout: float = TIMEOUT_S):
        if not is_http(address):
            raise RemoteError(f"{address}: not a dashboard address (http://HEAD:8265)")
        self.address = address.rstrip("/")
        self.timeout = timeout
        self.headers = auth_headers()
        self._client: JobSubmissionClient | None = None

    def get(self, path: str, auth: bool = True) -> requests.Response:
        """GET ``path`` with a timeout; 401/403 and connection failures as :class:`RemoteError`."""
        with one_line(self.address, timeout=self.timeout):
            r = requests.get(self.address + path, headers=self.headers if auth else {},
                             timeout=self.timeout)
        err = _status_error(self.address, r.status_code)
        if err is not None:
            raise err
        return r

    def version(self) -> str:
        """The cluster's Ray version (an authenticated request: checks the token too)."""
        r = self.get("/api/version")
        if r.status_code != 200:
            raise RemoteError(f"{self.address}: not a Ray dashboard (GET /api/version gave "
                              f"{r.status_code})")
        return str(r.json().get("ray_version", "?"))

    @property
    def client(self) -> JobSubmissionClient:
        """The Jobs API client, made once, after a quick check of the address and token."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self.version()  # fails fast (the client's own requests have no timeout)
            with one_line(self.address):
                self._client = JobSubmissionClient(self.address, headers=dict(self.headers))
        return self._client

    def submit(self, plan: Submission) -> str:
        """Submit a planned job (uploading its ``working_dir``); returns its submission id."""
        client = self.client
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)  # one INFO line per upload step
        with one_line(self.address):
            return client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                                     metadata=plan.metadata, submission_id=plan.submission_id)

    def info(self, job_id: str) -> JobDetails:
        """One job's details; :class:`RemoteError` when there is no such job."""
        client = self.client
        with one_line(self.address, job_id):
            return client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        """The job's status name (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED)."""
        return str(self.info(job_id).status)

    def jobs(self) -> list[JobDetails]:
        """Jobs submitted by ribray (metadata ``ribray: "1"``), oldest first."""
        client = self.client
        with one_line(self.address):
            jobs = client.list_jobs()
        mine = [j for j in jobs if (j.metadata or {}).get("ribray") == "1"]
        return sorted(mine, key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        self.info(job_id)
        with one_line(self.address, job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs to ``write`` until it ends; returns its final status."""
        self.info(job_id)
        client = self.client
        # the SDK logs every normal close of the log stream at INFO
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        with one_line(self.address, job_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # aiohttp's ssl=None, in Ray
            asyncio.run(tail())
        return self.wait(job_id, 30.0)

    def wait(self, job_id: str, timeout: float) -> str:
        """Poll until the job's status is terminal or ``timeout`` seconds pass; the status."""
        deadline = time.monotonic() + timeout
        status = self.status(job_id)
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            status = self.status(job_id)
        return status

    def stop(self, job_id: str, timeout: float = 30.0) -> tuple[str, str]:
        """Ask the job to stop and wait for it: (status before, status after)."""
        before = self.status(job_id)
        if before in TERMINAL:
            return before, before
        with one_line(self.address, job_id):
            self.client.stop_job(job_id)
        return before, self.wait(job_id, timeout)


def store_state(store: str) -> dict[str, Any] | None:
    """``status``, ``progress`` and ``error`` root attributes of a store readable from here
    (an absolute local path), else None."""
    from ribray.store import StoreError, open_store

    if not is_url(store) and not Path(store).is_absolute():
        return None
    try:
        attrs = dict(open_store(store).attrs)
    except (StoreError, OSError):
        return None
    return {k: attrs[k] for k in ("status", "progress", "error") if k in attrs}


def why_unreadable(store: str) -> str:
    """Why :func:`store_state` found nothing at ``store``, for ``ribray status``."""
    if is_url(store):
        return "not readable from this machine (not created yet, or no credentials here)"
    if not Path(store).is_absolute():
        return "a path on the cluster (relative to the job's working directory); not read here"
    if not Path(store).exists():
        return "nothing at this path on this machine (not created yet, or on another machine)"
    return "not a ribray store readable from this machine"


def format_progress(progress: Mapping[str, Any]) -> str:
    """``phase M/ln2.0, shards 3/8, 120 samples/s, ETA 40s`` from a store's ``progress``
    attribute (written by :class:`ribray.progress.Reporter`)."""
    parts = []
    if "phase" in progress:
        parts.append(f"phase {progress['phase']}")
    if "done" in progress and "total" in progress:
        parts.append(f"shards {progress['done']}/{progress['total']}")
    if progress.get("samples_per_s"):
        parts.append(f"{progress['samples_per_s']:.0f} samples/s")
    if progress.get("tokens_per_s"):
        parts.append(f"{progress['tokens_per_s']:.0f} tokens/s")
    if progress.get("eta") is not None:
        parts.append(f"ETA {progress['eta']:.0f}s")
    return ", ".join(parts) or str(dict(progress))


def short_message(message: str | None) -> str:
    """The first line of a job's status message, without the log excerpt Ray appends to it."""
    first = next((ln.strip() for ln in (message or "").splitlines() if ln.strip()), "")
    return first.split(", last available logs")[0]


def format_time(ms: int | None) -> str:
    """Milliseconds since the epoch as local time, or ``-``."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


# --- doctor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of ``ribray doctor``."""

    name: str
    ok: bool
    detail: str


def check_store(store: str | Path) -> Check:
    """Whether a store can be written at ``store``: a temporary file is created and deleted in
    it (an existing directory) or in its nearest existing parent; at a URL, an object beside
    the store."""
    if is_url(store):
        return _check_url_store(str(store))
    store = Path(store)
    if store.exists() and not store.is_dir():
        return Check("store", False, f"{store} is a file, not a directory")
    target = store if store.is_dir() else next((p for p in store.parents if p.exists()), None)
    if target is None or not target.is_dir():
        return Check("store", False, f"{store}: {target} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".ribray-doctor-", dir=target)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return Check("store", False, f"{target} is not writable ({exc.strerror or exc})")
    where = "store" if target == store else "parent"
    return Check("store", True, f"{store}: {where} {target} is writable (from this machine)")


def _resources(res: Mapping[str, float], nodes: int) -> Check:
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    detail = f"{nodes} node{'s' * (nodes != 1)}, {cpus:g} CPUs, {gpus:g} GPUs"
    if cpus <= 0:
        detail += ("; no worker nodes yet? ribray sizes its workers from the resources present "
                   "when the job starts")
    return Check("resources", cpus > 0, detail)


def _doctor_http(address: str) -> list[Check]:
    try:
        remote = Remote(address)
    except RemoteError as exc:
        return [Check("token", False, str(exc))]
    checks: list[Check] = []
    try:
        r = remote.get("/api/authentication_mode", auth=False)
    except RemoteError as exc:
        return [Check("address", False, str(exc))]
    mode = r.json().get("authentication_mode", "unknown") if r.status_code == 200 else "unknown"
    checks.append(Check("address", True, f"{remote.address} answers (token auth: {mode})"))
    if mode == "token" and not remote.headers:
        checks.append(Check("token", False, f"the cluster needs a token and none was found here; "
                                            f"{TOKEN_HINT}"))
        return checks
    try:
        version = remote.version()
    except RemoteError as exc:
        checks.append(Check("token", False, str(exc)))
        return checks
    used = "accepted" if remote.headers else "not needed"
    checks.append(Check("token", True, f"{used} (Ray {version})"))
    try:
        r = remote.get("/api/v0/nodes?detail=1&limit=10000")
        nodes = [n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]
    except (RemoteError, ValueError, KeyError, TypeError) as exc:
        checks.append(Check("resources", False, f"cannot list the cluster's nodes ({exc})"))
        return checks
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in (n.get("resources_total") or {}).items():
            total[k] = total.get(k, 0.0) + float(v)
    checks.append(_resources(total, len(nodes)))
    return checks


def _doctor_direct(address: str) -> list[Check]:
    import ray

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        return [Check("address", False, f"cannot reach the Ray GCS at {address} "
                                        f"({getattr(exc, 'strerror', None) or exc})")]
    checks = [Check("address", True, f"{address} accepts connections")]
    # ray.init retries a refused token for ~20 s (ray/_private/node.py); this knob bounds it
    wait_knob = "RAY_gcs_server_port_wait_time_s"
    saved = os.environ.get(wait_knob)
    os.environ.setdefault(wait_knob, "5")
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception as exc:  # noqa: BLE001 - one line; a refused token looks like this too
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = "if the cluster uses token authentication, set RAY_AUTH_MODE=token and "
        else:
            hint = "if the token is wrong, "
        checks.append(Check("token", False, f"ray.init failed ({_first_line(exc)}); "
                                            f"{hint}{TOKEN_HINT}"))
        return checks
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if saved is None:
            os.environ.pop(wait_knob, None)
    checks.append(Check("token", True, "ray.init connected"))
    checks.append(_resources(res, nodes))
    return checks


def _check_url_store(url: str) -> Check:
    from ribray.location import Location, LocationError

    try:
        probe = Location(url).sibling(f".ribray-doctor-{secrets.token_hex(4)}")
        probe.write_text("ribray doctor\n", "doctor")
        probe.unlink()
    except LocationError as exc:
        return Check("store", False, str(exc))
    except Exception as exc:  # noqa: BLE001 - any backend's refusal, in one line
        return Check("store", False, f"{url}: cannot write beside it ({type(exc).__name__}: "
                                     f"{exc})")
    return Check("store", True, f"{url}: writable (from this machine)")


def doctor(address: str | None, store: str | Path | None) -> list[Check]:
    """The checks of ``ribray doctor``: address, token, resources, store (when given)."""
    if not address:
        checks = [Check("address", True, f"none: ribray submit starts a local Ray instance here "
                                         f"({os.cpu_count()} CPUs)")]
    elif is_http(address):
        checks = _doctor_http(address)
    else:
        checks = _doctor_direct(address)
    if store is not None:
        checks.append(check_store(store))
    return checks
