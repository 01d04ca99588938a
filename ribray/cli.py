"""The ``ribray`` command line: a thin layer over :mod:`ribray.orchestrate` and :mod:`ribray.store`.

Errors the user can fix (job file, checkpoint, node layer, output path) print one line on
stderr and exit with code 2; a failure during the run exits with code 1 and leaves the store
marked ``failed``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from ribray.remote import Remote

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="LIB (Local Interaction Basis) jobs on Ray.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
# tables stay on one line per row when piped (rich assumes 80 columns without a terminal)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 110)

USER_ERROR = 2


def _fail(msg: str, code: int = USER_ERROR) -> typer.Exit:
    err.print(f"error: {msg}", markup=False)
    return typer.Exit(code)


def _line(text: str) -> None:
    """One plain line on stdout (no markup, never wrapped)."""
    out.print(text, markup=False, soft_wrap=True)


def _load(job_file: Path):
    from ribray.config import JobFileError, load_job

    try:
        return load_job(job_file)
    except JobFileError as exc:
        raise _fail(str(exc)) from None


@app.command()
def validate(job_file: Annotated[Path, typer.Argument(help="job YAML")]) -> None:
    """Check a job file (fields, checkpoint, node layers, data) without running it."""
    from ribray.hf import remote_parts
    from ribray.orchestrate import PreflightError, check_job

    job = _load(job_file)
    remote = remote_parts(job)
    if remote:  # a hub model or data set not on this machine: the fields only, no download
        out.print(f"{job_file}: ok ({job.basis.kind}, {len(job.basis.node_layers)} node "
                  f"layers); not checked here, being on the hub and not on this machine: "
                  f"{', '.join(remote)} (checked when the job runs)")
        return
    try:
        info = check_job(job)
    except PreflightError as exc:
        raise _fail(f"{job_file}: {exc}") from None
    out.print(f"{job_file}: ok ({job.basis.kind}, {len(job.basis.node_layers)} node layers, "
              f"{info['n_samples']} samples)")


@app.command()
def submit(
    job_file: Annotated[Path, typer.Argument(help="job YAML")],
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: start a "
                                                     "local instance", envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
    out_path: Annotated[str | None, typer.Option("--out", help="store path or fsspec URL "
                                                               "(overrides the job file's "
                                                               "`out`)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing store")] = False,
    dashboard: Annotated[bool, typer.Option(help="start the Ray dashboard (127.0.0.1) with a "
                                                 "local instance")] = True,
    follow: Annotated[bool, typer.Option(help="with an http address: stream the job's logs "
                                              "until it ends; exit 0 only if it succeeded")
                      ] = False,
) -> None:
    """Run a LIB job on Ray and write its Zarr store (http address: via the Jobs API)."""
    from ribray.remote import SUBMISSION_ENV, is_http

    job = _load(job_file)
    if is_http(address):
        if os.environ.get(SUBMISSION_ENV):  # never resubmit from the driver of a submission
            raise _fail(f"RAY_ADDRESS={address} inside submitted job "
                        f"{os.environ[SUBMISSION_ENV]}: expected the cluster's GCS address")
        _submit_remote(job_file, job, address, out_path, overwrite, follow)
        return
    from ribray.orchestrate import PreflightError, run_job

    store = out_path or job.out
    try:
        run_job(job, store, address=address, overwrite=overwrite, dashboard=dashboard,
                log=lambda s: err.print(s, markup=False), bars=err.is_terminal)
    except PreflightError as exc:
        raise _fail(f"{job_file}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a failed run: one line, the store says failed
        raise _fail(f"{job_file}: run failed: {type(exc).__name__}: {exc}"
                    f"{_store_state(store)}", 1) from None
    out.print(f"wrote {store}")


def _submit_remote(job_file: Path, job, address: str, out_path: str | None, overwrite: bool,
                   follow: bool) -> None:
    """``submit`` through the Jobs API: print the job id; with ``follow``, its logs and end."""
    from ribray.remote import RemoteError, plan_submission, short_message

    try:
        plan = plan_submission(job_file, job, out_path, overwrite)
    except RemoteError as exc:
        raise _fail(str(exc)) from None
    remote = _remote(address, "submit")
    wd = plan.runtime_env.get("working_dir")
    if wd and "://" not in wd:
        err.print(f"uploading {wd} (runtime_env.working_dir)", markup=False)
    job_id = _remote_call(lambda: remote.submit(plan))
    _line(job_id)
    err.print(f"submitted {job_id} to {remote.address} (store {plan.store}); ribray status "
              f"{job_id} | ribray logs {job_id} --follow | ribray stop {job_id}", markup=False)
    if follow:
        status = _follow(remote, job_id)
        if status != "SUCCEEDED":
            why = short_message(_remote_call(lambda: remote.info(job_id)).message)
            raise _fail(f"job {job_id} ended {status}" + (f": {why}" if why else ""), 1)
        _line(f"job {job_id}: {status}")


def _remote(address: str | None, command: str) -> Remote:
    """A :class:`ribray.remote.Remote` for an http(s) address, or exit 2 with one line."""
    from ribray.remote import Remote, RemoteError, is_http

    if not is_http(address):
        got = f" (got {address!r})" if address else ""
        raise _fail(f"ribray {command} talks to the Ray Jobs API: pass --address "
                    f"http://HEAD:8265 or set RAY_ADDRESS to it{got}")
    try:
        return Remote(address)
    except RemoteError as exc:
        raise _fail(str(exc)) from None


def _remote_call(call: Callable[[], T]) -> T:
    """Run a call on the cluster; a :class:`ribray.remote.RemoteError` exits 2 with its line,
    anything else exits 1 with one line."""
    from ribray.remote import RemoteError

    try:
        return call()
    except RemoteError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - one line, no traceback
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise _fail(f"{type(exc).__name__}: {first}", 1) from None


def _follow(remote: Remote, job_id: str) -> str:
    """Stream a job's logs to stdout until it ends; its final status."""
    try:
        return _remote_call(lambda: remote.follow(job_id, lambda s: typer.echo(s, nl=False)))
    except KeyboardInterrupt:
        raise _fail(f"stopped following; job {job_id} keeps running (ribray stop {job_id})",
                    130) from None


ADDRESS_HELP = "Ray dashboard address, http://HEAD:8265"


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="submission id; default: list ribray's "
                                                      "jobs")] = None,
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP, envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
) -> None:
    """List the cluster's ribray jobs, or show one job and its store's progress."""
    from ribray.remote import (
        format_progress,
        format_time,
        short_message,
        store_state,
        why_unreadable,
    )

    remote = _remote(address, "status")
    if job_id is None:
        rows = [["id", "name", "status", "started", "store"]]
        for j in _remote_call(remote.jobs):
            meta = j.metadata or {}
            rows.append([j.submission_id or j.job_id or "?", meta.get("name", ""), str(j.status),
                         format_time(j.start_time), meta.get("store", "")])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:  # one line per job, whatever the terminal width
            _line("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]))
        return
    info = _remote_call(lambda: remote.info(job_id))
    meta = info.metadata or {}
    _line(f"job {job_id}: {info.status} (started {format_time(info.start_time)}, ended "
          f"{format_time(info.end_time)})")
    if info.message:
        _line(f"  message: {short_message(info.message)}")
    for key in ("name", "config_hash", "store"):
        if key in meta:
            _line(f"  {key}: {meta[key]}")
    if "store" not in meta:
        return
    state = store_state(meta["store"])
    if state is None:
        _line(f"  store status: {why_unreadable(meta['store'])}")
        return
    line = f"  store status: {state.get('status', '?')}"
    if state.get("progress"):
        line += f"; progress: {format_progress(state['progress'])}"
    if state.get("error"):
        line += f"; error: {state['error']}"
    _line(line)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="submission id")],
    follow: Annotated[bool, typer.Option(help="keep streaming until the job ends")] = False,
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP, envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
) -> None:
    """Print a submitted job's logs (its driver's stdout and stderr)."""
    remote = _remote(address, "logs")
    if follow:
        status = _follow(remote, job_id)
        err.print(f"job {job_id}: {status}", markup=False)
        return
    typer.echo(_remote_call(lambda: remote.logs(job_id)), nl=False)


@app.command()
def stop(
    job_id: Annotated[str, typer.Argument(help="submission id")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP, envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
) -> None:
    """Stop a submitted job and wait (up to 30 s) until it has stopped."""
    remote = _remote(address, "stop")
    from ribray.remote import TERMINAL

    before, after = _remote_call(lambda: remote.stop(job_id))
    if before in TERMINAL:
        _line(f"job {job_id}: already {after}")
    elif after in TERMINAL:
        _line(f"job {job_id}: {after}")
    else:
        raise _fail(f"job {job_id}: stop requested, still {after} after 30 s", 1)


@app.command()
def doctor(
    address: Annotated[str | None, typer.Option(help="Ray dashboard (http://HEAD:8265) or GCS "
                                                     "(HOST:6379) address", envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
    store: Annotated[str | None, typer.Option(help="store path or fsspec URL to check for "
                                                   "writing")] = None,
) -> None:
    """Check a cluster address, its token, its CPUs and GPUs, and a store path."""
    from ribray.remote import doctor as run_checks

    checks = run_checks(address, store)
    for c in checks:
        _line(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _store_state(store: str) -> str:
    """' (store S marked failed)' when the run got as far as creating its store."""
    from ribray.store import StoreError, open_store

    try:
        status = open_store(store).attrs.get("status")
    except StoreError:
        return ""
    return f" (store {store} marked {status})" if status == "failed" else ""


@app.command()
def show(
    store: Annotated[str, typer.Argument(help="Zarr store (path or fsspec URL) written by "
                                              "`ribray submit`")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable summary")] = False,
) -> None:
    """Summarise a store: layers, dims kept, top eigenvalues, edge sums."""
    from ribray.store import StoreError, open_store, summary

    try:
        s = summary(open_store(store))
    except StoreError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    out.print(f"[bold]{escape(str(store))}[/bold]: job {escape(str(s['name']))}, basis "
              f"{s['basis']}, status {s['status']}")
    has_var = any(row.get("variance_lambda") is not None for row in s["layers"])
    cols = ["node layer", "width", "features", "Λ const", *(["Λ ln var"] if has_var else []),
            "top Λ (others)", "done"]
    t = Table(*cols)
    for row in s["layers"]:
        lam = ", ".join(f"{v:.3g}" for v in row.get("top_lambdas", [])[:3])
        const, var = row.get("const_lambda"), row.get("variance_lambda")
        width, feats = row.get("width"), row.get("features")
        t.add_row(escape(row["layer"]), "" if width is None else str(width),
                  "" if feats is None else str(feats),
                  "" if const is None else f"{const:.3g}",
                  *([("" if var is None else f"{var:.3g}")] if has_var else []), lam,
                  "yes" if row["complete"] else "no")
    out.print(t)
    if s.get("features"):
        out.print("feature examples (top, bottom, intervals; features/): "
                  + ", ".join(escape(n) for n in s["features"]))
    stable = [(r["layer"], r["stability"]) for r in s["layers"] if r.get("stability")]
    if stable:
        ts = Table("layer", "shards", "top Λ jackknife s.e. (relative)", "principal angle, "
                   "max / median (°)", title="Is the data enough? (leave one shard out)")
        for name, st in stable:
            rel = ", ".join(f"{v:.1%}" for v in st["top_lambda_rel_se"][:3])
            ts.add_row(escape(name), str(st["n_shards"]), rel,
                       f"{st['max_principal_angle_deg']:.1f} / "
                       f"{st['median_principal_angle_deg']:.1f}")
        out.print(ts)
    _show_sources(s["layers"])
    if s["edges"]:
        has_err = any(e.get("edges_rel_error") is not None for e in s["edges"])
        te = Table("edges", "shape", "ΣE", "max E", *(["rel. error (sources)"] if has_err
                                                       else []))
        for e in s["edges"]:
            err = e.get("edges_rel_error")
            te.add_row(escape(e["edge"]), "x".join(map(str, e["shape"])), f"{e['sum']:.6g}",
                       f"{e['max']:.6g}", *([("" if err is None else _pct(err))] if has_err
                                            else []))
        out.print(te)
    if s["timings"]:
        out.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings"].items()))
    if s.get("analysis"):
        _show_analysis(s["analysis"])


def _show_sources(layers: list[dict]) -> None:
    """The stochastic sources' error of each layer that has one (``stochastic_error``)."""
    rows = [(r["layer"], r["stochastic_error"]) for r in layers if r.get("stochastic_error")]
    if not rows:
        return
    t = Table("layer", "r", "M rel. error", "top Λ s.e. (relative)",
              title="Stochastic sources (spread between sources)")
    for name, st in rows:
        if "m_rel_error" not in st:
            t.add_row(escape(name), str(st.get("r")), escape(str(st.get("reason", ""))), "")
            continue
        rel = ", ".join(_pct(v) for v in st["top_lambda_rel_se"][:3])
        t.add_row(escape(name), str(st["r"]), _pct(st["m_rel_error"]), rel)
    out.print(t)


def _pct(v: float) -> str:
    """A relative error as a percentage with two significant digits (0.015%, 28%)."""
    return f"{100 * v:.2g}%"


def _show_analysis(a: dict) -> None:
    head = f"analysis: status {a.get('status')}"
    if a.get("base_score") is not None:
        head += (f", {a.get('score_kind')} {a['base_score']:.6g} unablated on "
                 f"{a.get('n_samples')} samples (tolerance {a.get('tolerance'):g})")
    out.print(head)
    if a.get("edge_ablation"):
        t = Table("layer pair", "edges required", "of", "ε", "evaluations")
        for e in a["edge_ablation"]:
            eps = e.get("epsilon")
            t.add_row(escape(e["edge"]), str(e["edges_required"]), str(e["n_candidates"]),
                      "" if eps is None else f"{eps:.4g}", str(e["evaluations"]))
        out.print(t)
    for m in a.get("modularity", []):
        out.print(f"modularity γ={m['resolution']:g}: Q = {m['modularity']:.4f}, "
                  f"{m['n_modules']} modules")
    if a.get("node_ablation"):
        out.print("node ablation: " + ", ".join(f"{n['layer']} ({n['points']} points)"
                                                for n in a["node_ablation"]))
    if a.get("labels"):
        out.print("Fourier labels: " + ", ".join(a["labels"]))


@app.command()
def analyze(
    store: Annotated[str, typer.Argument(help="complete Zarr store (path or fsspec URL) "
                                              "written by `ribray submit`")],
    job_file: Annotated[Path | None, typer.Option("--job", help="analysis YAML (default: all "
                                                                "defaults, see docs/analysis.md)"
                                                  )] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: start a "
                                                     "local instance", envvar="RAY_ADDRESS",
                                                show_envvar=True)] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the store's existing analysis")] = False,
    report_dir: Annotated[Path | None, typer.Option("--report", help="folder for plots and "
                                                                     "report.html")] = None,
    dashboard: Annotated[bool, typer.Option(help="start the Ray dashboard (127.0.0.1) with a "
                                                 "local instance")] = True,
) -> None:
    """Ablations, bisect search, Leiden modules, labels, plots and an HTML report of a store."""
    from ribray.analyze import run_analysis
    from ribray.config import AnalysisSpec, JobFileError, load_analysis
    from ribray.orchestrate import PreflightError
    from ribray.store import StoreError

    where = str(job_file) if job_file else str(store)
    try:
        spec = load_analysis(job_file) if job_file else AnalysisSpec()
    except JobFileError as exc:
        raise _fail(str(exc)) from None
    log = lambda s: err.print(s, markup=False)  # noqa: E731
    folder = report_dir or (Path(spec.report) if spec.report else default_report_dir(store))
    if spec.plots.enabled and folder.exists() and not folder.is_dir():
        field = "--report" if report_dir else f"{where}: field report"
        raise _fail(f"{field}: {folder} is a file, not a folder")
    try:
        run_analysis(store, spec, address=address, overwrite=overwrite, dashboard=dashboard,
                     log=log)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    except PreflightError as exc:
        raise _fail(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one line; analysis/ says failed
        raise _fail(f"{store}: analysis failed: {type(exc).__name__}: {exc}", 1) from None
    if spec.plots.enabled:
        from ribray.report import write_report

        try:
            page = write_report(store, folder, spec.plots, log=log)
        except Exception as exc:  # noqa: BLE001 - the analysis is in the store; say so
            raise _fail(f"{folder}: report failed ({type(exc).__name__}: {exc}); the analysis "
                        f"is complete in {store}", 1) from None
        out.print(f"report: {page}")
    out.print(f"wrote {store}/analysis")


def default_report_dir(store: str | Path) -> Path:
    """STORE_NAME-report beside a local store (``results/x.zarr`` -> ``results/x-report``);
    for a store at a URL, in the current folder (a report is read in a browser, locally)."""
    from ribray.location import is_url

    name = str(store).rstrip("/").rsplit("/", 1)[-1]
    name = name[:-5] if name.endswith(".zarr") else name
    return Path.cwd() / f"{name}-report" if is_url(store) else Path(store).parent / f"{name}-report"


@app.command()
def compare(
    stores: Annotated[list[str], typer.Argument(help="analysed stores (LIB, PCA, ...)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the comparison plots")],
) -> None:
    """Edges required per layer (bar chart) and ablation curves of several analysed stores."""
    from ribray.report import write_comparison
    from ribray.store import StoreError

    try:
        page = write_comparison(stores, out_dir)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    out.print(f"comparison: {page}")


@app.command()
def train(
    task: Annotated[str, typer.Argument(help="modadd | digits-mlp | lm-smoke")],
    out_path: Annotated[Path, typer.Option("--out", help="checkpoint (lm-smoke: folder) to "
                                                         "write")],
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    modulus: Annotated[int, typer.Option(help="modadd: p")] = 113,
    max_epochs: Annotated[int, typer.Option(help="modadd: stop here if not grokked")] = 60000,
    text: Annotated[str | None, typer.Option(help="lm-smoke: text the tokenizer is fitted "
                                                  "to")] = None,
) -> None:
    """Train a model of the paper (modular addition until it groks, an MLP on digits), or
    make the tiny random GPT-2 of the language-model smoke job (lm-smoke)."""
    from ribray.train import train_digits_mlp, train_modadd

    if task == "modadd":
        meta = train_modadd(out_path, p=modulus, seed=seed, max_epochs=max_epochs,
                            log=lambda s: err.print(s, markup=False))
        if meta["test_acc"] < 0.999:
            raise _fail(f"did not grok within {max_epochs} epochs (test accuracy "
                        f"{meta['test_acc']:.4%}); checkpoint saved anyway", 1)
    elif task == "digits-mlp":
        train_digits_mlp(out_path, seed=seed, log=lambda s: err.print(s, markup=False))
    elif task == "lm-smoke":
        from ribray.train import make_lm_smoke

        meta = make_lm_smoke(out_path, Path(text or "data/lm-smoke.txt"), seed=seed)
        out.print(f"wrote {out_path}: random GPT-2, {meta['parameters']} parameters, "
                  f"vocabulary {meta['vocab']}")
    else:
        raise _fail(f"unknown task {task!r}: choose modadd, digits-mlp or lm-smoke")


if __name__ == "__main__":  # pragma: no cover
    app()
