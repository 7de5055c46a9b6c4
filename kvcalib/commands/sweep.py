"""Sweep commands: ``sweep run|show|list|promote`` (Optuna studies of a method's hyperparameters, see
docs/sweeps.md) and ``dashboard`` (optuna-dashboard on the same storage).

Storage is the service database (``KVCALIB_DATABASE_URL``, default the embedded SQLite file); trials run on the
Celery workers when a broker is configured (``KVCALIB_BROKER_URL``) unless ``--in-process`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvcalib.commands.common import console, emit_json, fail, friendly_errors

sweep_app = typer.Typer(no_args_is_help=True, help="Optuna sweeps of a method's hyperparameters (see docs/sweeps.md).")

StudyOpt = Annotated[str | None, typer.Option("--study", help="Full study name (overrides the derived "
                                                                 "kvcalib:<model>:<method>:<allocator>[:<suffix>]).")]
SuffixOpt = Annotated[str | None, typer.Option("--suffix", help="Suffix of the derived study name.")]
MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help="Scoring method (default: "
                                                                     "KVCALIB_DEFAULT_METHOD, compactor).")]
AllocOpt = Annotated[str | None, typer.Option("--allocator", "-a", help="Allocator (default: "
                                                                         "KVCALIB_DEFAULT_ALLOCATOR, adakv).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Registry model (default: KVCALIB_DEFAULT_MODEL).")]
DbOpt = Annotated[str | None, typer.Option("--database-url", help="Storage (default KVCALIB_DATABASE_URL / the "
                                                                    "embedded SQLite file).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ObjectiveOpt = Annotated[str | None, typer.Option(
    "--objective", help="truth: mean recommended ratio vs realised answer loss on task-truth documents (new "
                        "studies' default); reconstruction: mean r* vs held-out reconstruction-fidelity loss (the "
                        "historical objective; its studies keep the name without a truth-<fidelity> part).")]
FidelityOpt = Annotated[str | None, typer.Option(
    "--fidelity", help="Label-free fidelity the calibration uses (truth objective; part of the study name): "
                       "reconstruction (default), kl, salient, keytoken, self_answer, self_prob.")]


def _settings(**overrides):
    from kvcalib.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _storage(s, heartbeat: bool = True):
    from kvcalib.sweep.storage import make_storage

    return make_storage(s.db_url, heartbeat=heartbeat, settings=s)


def _objective(objective: str | None) -> str:
    from kvcalib.sweep.spec import OBJECTIVES

    objective = "truth" if objective is None else objective
    if objective not in OBJECTIVES:
        fail(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective


def _name(study: str | None, model: str | None, method: str | None, allocator: str | None, suffix: str | None,
          s, objective: str | None = None, fidelity: str | None = None) -> str:
    """The study's name: ``--study``, else derived from (model, method, allocator), and for a truth study (the
    default objective) the fidelity, plus ``--suffix``."""
    from kvcalib.sweep.spec import study_name

    if study:
        if suffix:
            fail("give either --study or --suffix, not both")
        return study
    objective = _objective(objective)
    return study_name(model or s.default_model, method or s.default_method, allocator or s.default_allocator, suffix,
                      objective=objective, fidelity=fidelity)


def _questions(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    try:
        q = tuple(int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        q = ()
    if len(q) != 4:
        fail(f"--questions must be four integers NEEDLES,KV_PAIRS,MULTI_VALUES,DOC_QUESTIONS, got {text!r}")
    return q


def _ratios(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        fail(f"--ratios must be comma-separated numbers, got {text!r}")


def _doc_tokens(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        fail(f"--doc-tokens must be MIN:MAX, got {text!r}")
    if not 16 <= lo <= hi:
        fail(f"--doc-tokens needs 16 <= MIN <= MAX, got {text!r}")
    return lo, hi


@sweep_app.command("run")
@friendly_errors
def run(
    method: MethodOpt = None,
    allocator: AllocOpt = None,
    trials: Annotated[int, typer.Option("--trials", "-n", min=0, help="Trials to add to the study.")] = 16,
    corpus: Annotated[Path | None, typer.Option(help="Calibration corpus: JSONL of {id, text}, a folder of .txt, "
                                                        "or one .txt, cut into --doc-tokens chunks. Default: the "
                                                        "essay corpus.")] = None,
    study: StudyOpt = None,
    suffix: SuffixOpt = None,
    model: ModelOpt = None,
    ratios: Annotated[str | None, typer.Option(help="Ratio grid, e.g. 0.2,0.4,0.6,0.8 (default: calibration's "
                                                       "0.1,...,0.9,0.95).")] = None,
    tolerance: Annotated[float | None, typer.Option(help="τ (default KVCALIB_DEFAULT_TOLERANCE).")] = None,
    probes: Annotated[int | None, typer.Option(help="Calibration probes per document (default 4).")] = None,
    holdout_probes: Annotated[int | None, typer.Option(help="Held-out probes re-checking r* (reconstruction "
                                                             "objective; default 2).")] = None,
    probe_tokens: Annotated[int | None, typer.Option(help="Target tokens per probe (default 12).")] = None,
    cue_tokens: Annotated[int | None, typer.Option(help="Cue tokens per probe (default 8).")] = None,
    max_docs: Annotated[int, typer.Option(help="Documents taken from the corpus.")] = 8,
    doc_tokens: Annotated[str, typer.Option(help="MIN:MAX tokens of the documents cut from the corpus texts.")]
    = "256:512",
    population: Annotated[int, typer.Option(help="NSGA-II population size.")] = 16,
    seed: Annotated[int | None, typer.Option(help="Probe seed (default 0).")] = None,
    objective: ObjectiveOpt = None,
    fidelity: FidelityOpt = None,
    questions: Annotated[str | None, typer.Option(help="Truth objective: items per document, NEEDLES,KV_PAIRS,"
                                                          "MULTI_VALUES,DOC_QUESTIONS (default 4,4,0,2).")] = None,
    question_seed: Annotated[int | None, typer.Option(help="Truth objective: base seed of the documents' "
                                                              "questions (default 0).")] = None,
    broker: Annotated[bool | None, typer.Option("--broker/--in-process", help="Run trials on the Celery workers "
                                                   "(default when KVCALIB_BROKER_URL is set) or in this process.")]
    = None,
    queue: Annotated[str | None, typer.Option(help="Celery queue (default KVCALIB_QUEUE).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop waiting for the workers after this many seconds "
                                                          "(queued trials still run).")] = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
):
    """Create or resume the study of (model, method, allocator[, fidelity]) and run TRIALS more trials."""
    from tqdm import tqdm

    from kvcalib import sweep as sw

    s = _settings(database_url=database_url)
    use_broker = bool(s.broker_url) if broker is None else broker
    if use_broker and not s.broker_url:
        fail("--broker needs KVCALIB_BROKER_URL (or run --in-process)")
    name = _name(study, model, method, allocator, suffix, s, objective, fidelity)
    storage = _storage(s)
    lo, hi = _doc_tokens(doc_tokens)
    given = {"model": model, "method": method, "allocator": allocator, "ratios": _ratios(ratios),
             "tolerance": tolerance, "n_probes": probes, "holdout_probes": holdout_probes,
             "probe_tokens": probe_tokens, "cue_tokens": cue_tokens, "seed": seed, "objective": objective,
             "fidelity": fidelity, "questions": _questions(questions), "question_seed": question_seed}
    existing = {x["study"] for x in sw.list_studies(storage)}
    spec = None
    if name not in existing:
        if _objective(objective) == "truth" and holdout_probes is not None:
            fail("--holdout-probes belongs to the reconstruction objective (a truth study checks answers instead)")
        from kvcalib.service.runtime import model_info

        mth, alloc = method or s.default_method, allocator or s.default_allocator
        sw.search_space(mth, alloc)  # fail before reading the corpus
        mdl = model or s.default_model
        tok = model_info(mdl).tokenizer
        docs = sw.load_corpus(corpus, tokenizer=tok, min_tokens=lo, max_tokens=hi, max_docs=max_docs)
        spec = sw.SweepSpec(model=mdl, method=mth, allocator=alloc,
                            documents=docs, population_size=population,
                            tolerance=s.default_tolerance if tolerance is None else tolerance,
                            corpus_source=str(corpus) if corpus else "essays", objective=_objective(objective),
                            **{k: v for k, v in given.items()
                               if v is not None and k not in ("model", "method", "allocator", "tolerance",
                                                              "objective")})
    elif corpus is not None:
        from kvcalib.service.runtime import model_info

        stored = sw.spec_of(sw.load_study(name, storage))
        given["documents"] = sw.load_corpus(corpus, tokenizer=model_info(stored.model).tokenizer, min_tokens=lo,
                                            max_tokens=hi, max_docs=max_docs)
    bar = tqdm(total=trials, desc=name, unit="trial", disable=as_json or trials == 0)

    def on_trial(out: dict) -> None:
        if out.get("status") == "complete":
            bar.update(1)
            v = out.get("values") or [float("nan")] * 2
            vr = out.get("violation_rate")
            bar.set_postfix(r_star=f"{v[0]:.3f}", loss=f"{v[1]:.3f}",
                            **({"violations": f"{vr:.2f}"} if isinstance(vr, float) else {}))
        else:
            bar.write(f"trial {out.get('trial', '?')} failed: {out.get('error', out.get('status'))}")

    if not as_json:
        where = f"the Celery workers of queue {queue or s.queue!r}" if use_broker else "this process"
        kind = spec.objective if spec else sw.spec_of(sw.load_study(name, storage)).objective
        console.print(f"[dim]study {name!r} ({'new' if spec else 'resumed'}, {kind} objective), trials on "
                      f"{where}[/]")
    runner = None
    if use_broker:
        from kvcalib.worker.sweep_tasks import run_with_broker as runner
    try:
        rep = sw.run_sweep(name, trials, spec=spec, given=given, broker=use_broker, settings=s, storage=storage,
                           queue=queue, timeout=timeout, on_trial=on_trial, broker_runner=runner)
    except KeyboardInterrupt:
        bar.close()
        fail("interrupted" + (": trial tasks already sent stay queued and will still run (resume to wait for "
                              "them, or purge the queue)" if use_broker else ": the running trial was marked "
                              "failed"), code=130)
    finally:
        bar.close()
    if as_json:
        out = rep.to_dict()
        out["pareto"] = sw.trial_rows(sw.load_study(name, storage))
        emit_json(out)
        return
    console.print(f"{rep.completed} trial(s) completed, {rep.failed} failed"
                  + (f", {rep.pending} still queued" if rep.pending else "")
                  + f" in {rep.seconds:.1f}s; the study holds {rep.n_trials_total} trial(s)")
    st = sw.load_study(name, storage)
    _print_rows(sw.trial_rows(st), f"Pareto front of {name}", sw.spec_of(st).objective)
    if rep.completed == 0 and trials > 0:
        raise typer.Exit(1)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_rows(rows: list[dict], title: str, objective: str = "reconstruction") -> None:
    from rich.console import Console
    from rich.table import Table

    truth = objective == "truth"
    cols = ["trial", "mean r*", "answer loss" if truth else "fidelity loss", "violation rate"]
    table = Table(*cols, *(["mean r*_task"] if truth else []), "pareto", "parameters", title=title)
    for r in rows:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        table.add_row(str(r["trial"]) + (" (defaults)" if r["baseline"] else ""), _fmt(r["r_star_mean"]),
                      _fmt(r["loss"]), _fmt(r["violation_rate"]),
                      *([_fmt(r.get("r_star_task_mean"))] if truth else []), "yes" if r["pareto"] else "", params)
    Console().print(table)


@sweep_app.command("show")
@friendly_errors
def show(
    study_arg: Annotated[str | None, typer.Argument(metavar="[STUDY]", help="Study name (or use --method/...).")]
    = None,
    method: MethodOpt = None,
    allocator: AllocOpt = None,
    model: ModelOpt = None,
    suffix: SuffixOpt = None,
    objective: ObjectiveOpt = None,
    fidelity: FidelityOpt = None,
    all_trials: Annotated[bool, typer.Option("--all", help="Every completed trial, not just the Pareto front.")]
    = False,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
):
    """Print a study's Pareto front (mean r* up, loss down: answer loss of a truth study, fidelity loss of a
    reconstruction one)."""
    from kvcalib import sweep as sw

    s = _settings(database_url=database_url)
    name = _name(study_arg, model, method, allocator, suffix, s, objective, fidelity)
    st = sw.load_study(name, _storage(s))
    spec = sw.spec_of(st)
    rows = sw.trial_rows(st, pareto_only=not all_trials)
    if as_json:
        emit_json({"study": name, "study_id": st._study_id, "n_trials": len(st.trials),
                   "spec": spec.summary(), "trials" if all_trials else "pareto": rows})
        return
    _print_rows(rows, f"{'Completed trials' if all_trials else 'Pareto front'} of {name} "
                      f"({len(st.trials)} trials)", spec.objective)


@sweep_app.command("list")
@friendly_errors
def list_(database_url: DbOpt = None, as_json: JsonOpt = False):
    """List the studies in the storage."""
    from rich.console import Console
    from rich.table import Table

    from kvcalib import sweep as sw

    rows = sw.list_studies(_storage(_settings(database_url=database_url)))
    if as_json:
        emit_json(rows)
        return
    table = Table("id", "study", "trials", "created")
    for r in rows:
        table.add_row(str(r["study_id"]), r["study"], str(r["n_trials"]), r["created"] or "-")
    Console().print(table)


@sweep_app.command("promote")
@friendly_errors
def promote(
    study_arg: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    trial: Annotated[int | None, typer.Option(help="Promote this trial (default: see --max-loss).")] = None,
    max_loss: Annotated[float | None, typer.Option(help="Pick the Pareto trial with the largest mean r* whose loss "
                                                        "is at most this (else the smallest loss); default 0.05 "
                                                        "(answer loss) for a truth study, 0 (fidelity loss) for "
                                                        "a reconstruction one.")] = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
):
    """Promote a trial's parameters to the defaults the API uses for (model, method)."""
    from kvcalib import sweep as sw

    s = _settings(database_url=database_url)
    entry = sw.promote(study_arg, trial=trial, max_loss=max_loss, storage=_storage(s), data_dir=s.data_dir)
    if as_json:
        emit_json(entry)
        return
    console.print(f"promoted trial {entry['trial']} of {study_arg!r} for {entry['model']}/{entry['method']}: "
                  f"{entry['method_params']}"
                  + (f", allocator {entry['allocator']} {entry['allocator_params']}" if entry["allocator_params"]
                     else "")
                  + " (" + ", ".join(f"{k} {v:.4f}" for k, v in entry["values"].items()) + ")"
                  + f" -> {sw.promoted_path(s.data_dir)}")


@friendly_errors
def dashboard(
    host: Annotated[str, typer.Option(help="Bind address (loopback by default: the dashboard can edit studies).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port).")] = 8080,
    database_url: DbOpt = None,
):
    """Serve optuna-dashboard on the sweep storage (the service database)."""
    import wsgiref.simple_server

    from optuna_dashboard import wsgi

    from kvcalib.service.db import _redact

    s = _settings(database_url=database_url)
    app = wsgi(_storage(s, heartbeat=False))

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):  # noqa: D401 - no per-request lines on stderr
            pass

    try:
        server = wsgiref.simple_server.make_server(host, port, app, handler_class=Quiet)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    url = f"http://{host}:{server.server_port}/dashboard"
    console.print(f"optuna-dashboard on {_redact(s.db_url)}: {url}  (Ctrl-C to stop)")
    typer.echo(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    app.add_typer(sweep_app, name="sweep")
    app.command("dashboard")(dashboard)
