"""``kvcalib budget FILE``: the recommended compression ratio of one document and its per-layer and per-head budgets,
from the engine's prediction (``calib.calibration.calibrate.predict``: one prefill + scores, no probes), with what a
server needs beside them: the model shape in its dtype and the hash of the exact context token ids
(``token_ids_hash``; ``GET /budget?ids_hash=`` finds a stored profile by it).

    kvcalib budget essay.txt [--method compactor --allocator adakv --tolerance 0.95 --predictor predictors/ --json]
                             [--dtype bf16 --device cuda]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kvcalib.calib import defaults
from kvcalib.commands.common import (
    DeviceOpt,
    DtypeOpt,
    console,
    emit_json,
    fail,
    friendly_errors,
    read_text_file,
)


def default_predictor(model: str, config: Any) -> Any:
    """What ``predict`` uses by default — the predictor shipped for ``model``
    (``calib.predictors.bundled.default_predictor``) — when it was fitted for ``config``'s method, allocator and τ;
    otherwise the service's documented fallback with no stored profile: Compactor's parametric curve with neutral
    parameters, r = 1 − τ (``FallbackPredictor``, version ``fallback-parametric-b0``)."""
    from kvcalib.calib.predictors.bundled import default_predictor as shipped
    from kvcalib.service.predictions import FallbackPredictor, predictor_fits

    pred = shipped(model, config.method, config.allocator)
    if pred is not None and predictor_fits(pred, config):
        return pred
    return FallbackPredictor([], config.tolerance)


def _table(pred: dict, n_tokens: int) -> Table:
    heads = len(pred["head_budgets"][0]) if pred["head_budgets"] else 0
    table = Table("layer", "kept (sum of heads)", "kept fraction", "kept per kv head",
                  title=f"budgets at ratio {pred['ratio']:.3f} ({heads} kv heads per layer, {n_tokens} tokens)")
    for i, (total, per_head) in enumerate(zip(pred["layer_budgets"], pred["head_budgets"])):
        table.add_row(str(i), str(total), f"{total / (heads * n_tokens):.1%}", " ".join(map(str, per_head)))
    return table


@friendly_errors
def budget(
    file: Annotated[Path, typer.Argument(help="Text file of the document (UTF-8).")],
    model: Annotated[str, typer.Option(help="Registry name or local HF model folder.")] = defaults.MODEL,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `kvcalib methods`).")]
    = defaults.METHOD,
    allocator: Annotated[str, typer.Option("--allocator", "-a", help="Budget allocator across heads/layers.")]
    = defaults.ALLOCATOR,
    tolerance: Annotated[float, typer.Option(help="Fidelity tolerance τ of the recommended ratio.")]
    = defaults.TOLERANCE,
    predictor: Annotated[Path | None, typer.Option(
        help="Trained predictor (folder or file from `kvcalib fit`); default: the one shipped for the model when it "
             "fits the method, allocator and τ, else the fallback r = 1 − τ.")]
    = None,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with the full per-layer/per-head arrays.")]
    = False,
):
    """Recommend a compression ratio for FILE and print its per-layer and per-head token budgets."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, context_ids, predict
    from kvcalib.calib.integrations.servers import model_shape, token_ids_hash
    from kvcalib.calib.lm.support import parse_dtype
    from kvcalib.commands.stages import Stages, load_staged_engine

    # names and τ are refused here, before the model loads
    config = CalibrationConfig.from_dict({"method": method, "allocator": allocator, "tolerance": tolerance})
    parse_dtype(dtype)  # an unknown dtype is refused before the model loads
    text = read_text_file(file, "document")
    if not text.strip():
        fail(f"document {str(file)!r} is empty")
    chosen = None
    if predictor is not None:
        from kvcalib.calib.predictors import load_predictor

        chosen = load_predictor(predictor)  # a bad file is refused before the model loads
    with Stages(quiet=as_json) as stages:
        eng = load_staged_engine(model, stages, score_label=f"scoring with {config.method}, features, budgets",
                                 device=device, dtype=dtype)
        pred = predict(eng, text, config, chosen or default_predictor(eng.lm.name, config))
    ids, doc_start = context_ids(eng, text)
    shape = model_shape(eng.lm.model).to_dict()
    out = {"file": str(file), "model": eng.lm.name, "method": config.method, "allocator": config.allocator,
           "tolerance": config.tolerance, **pred.to_dict(), "dtype": shape["dtype"], "model_shape": shape,
           "prompt_format": {"kind": "chat_template", "model": eng.lm.name, "context_tokens": int(ids.numel()),
                             "doc_start": doc_start, "ids_hash": token_ids_hash(eng.lm.name, ids)}}
    if as_json:
        emit_json(out)
        return
    n = pred.context_tokens
    console.print(f"{file}: {n} tokens; {config.method}/{config.allocator}, τ = {config.tolerance}; "
                  f"predictor {pred.predictor_version}; {shape['dtype']}; ids_hash "
                  f"{out['prompt_format']['ids_hash'][:16]}…", soft_wrap=True, highlight=False)
    if pred.predictor_version.startswith("fallback"):
        console.print("[dim]no trained predictor: the documented fallback r = 1 − τ (pass --predictor)[/]")
    Console().print(_table(out, n))
    typer.echo(f"ratio {pred.ratio:.3f}: keep {pred.token_budget} of {n} tokens per head on average "
               f"({1 - pred.ratio:.1%})")


def register(app: typer.Typer) -> None:
    app.command("budget")(budget)
