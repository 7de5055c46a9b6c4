"""Answer a question about a document with a plain transformers model whose KV cache kvcalib compresses inside the
model's own prefill (issue 17, item 7).

    python examples/hf_generate.py CONTEXT_FILE QUESTION [--ratio auto|R] [--model NAME] [--max-new-tokens N]

Prints one JSON object: answer, ratio, context_tokens, kv_bytes_held, kv_bytes_full (and the predictor used).
``--ratio auto`` (default) predicts the ratio from features of that same prefill with the shipped predictor.
``--model``: a kvcalib registry name (its GGUF converted once to a transformers folder) or a local HF folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcalib.calib import build_prompt, compress, defaults
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.integrations.hf import new_cache
from kvcalib.calib.lm.registry import resolve_model_dir


def ratio_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1), got {value!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("context_file", type=Path, help="UTF-8 text file of the document")
    p.add_argument("question")
    p.add_argument("--ratio", type=ratio_arg, default="auto", help="'auto' (predicted) or a ratio in [0, 1)")
    p.add_argument("--model", default=defaults.MODEL, help="registry name or local Hugging Face folder")
    p.add_argument("--method", default=defaults.METHOD)
    p.add_argument("--allocator", default=defaults.ALLOCATOR)
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p.parse_args(argv)


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    try:
        text = args.context_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KvcalibError(f"cannot read {args.context_file}: {e}") from e
    name, folder = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()  # a plain transformers model
    prompt = build_prompt(tok, text, args.question)  # [chat header + document] | [question + assistant turn]
    cache = new_cache()
    with compress(model, method=args.method, allocator=args.allocator, ratio=args.ratio, tokenizer=tok, text=text,
                  name=name) as press:
        model(prompt.context_ids[None], past_key_values=cache)  # the prefill: scored and compressed as it runs
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    out = model(prompt.question_ids[None], past_key_values=cache)  # decoding continues from the kept entries
    ids: list[int] = []
    for _ in range(args.max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in eos:
            break
        ids.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=cache)
    o = press.outcome
    return {"answer": tok.decode(ids, skip_special_tokens=True).strip(), "ratio": round(o.ratio, 4),
            "context_tokens": o.context_tokens, "kv_bytes_held": o.kv_bytes_held, "kv_bytes_full": o.kv_bytes_full,
            "achieved_ratio": round(o.achieved_ratio, 4), "predictor_version": o.predictor_version, "model": name}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except KvcalibError as e:
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
