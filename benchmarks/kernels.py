"""Time every Triton kernel of ``kvcalib.kernels`` against its torch reference.

    python benchmarks/kernels.py [--n 32768] [--out results/kernels.json]
    python benchmarks/kernels.py --interpret-smoke      # CPU: tiny shapes through Triton's interpreter

On CUDA each op runs at realistic sizes (Hq=32, Hkv=8, d=128, N=32k context, one layer, plus one batch of 32
layers) with ``triton.testing.do_bench`` (median ms); the table shows both timings, the speed-up and the bandwidth
the Triton kernel achieves on the bytes it must move at least (inputs read once, outputs written once). Without a
GPU nothing is timed: the script says so, writes a JSON stating it, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernels.json"), help="JSON results file")
    parser.add_argument("--n", type=int, default=32768, help="context length N of the single-layer cases")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="run tiny shapes through Triton's CPU interpreter and compare with the references")
    return parser.parse_args(argv)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(n: int, device: str):
    """Yield (op, shape, triton_fn, torch_fn, bytes moved at least) for realistic inputs on ``device``."""
    import torch

    from kvcalib import kernels

    bf16 = dict(device=device, dtype=torch.bfloat16)
    hq, hkv, d = 32, 8, 128
    stats_all = ("attn", "attn_sq", "obc_key", "obc_cross")
    for bsz, nn, w, stats in [(1, n, 32, ("attn",)), (1, n, 64, ("attn",)), (1, n, 32, stats_all),
                              (32, n // 4, 32, ("attn",))]:
        q = torch.randn(bsz, hq, w, d, **bf16)  # (B, Hq, w, d)
        k = torch.randn(bsz, hkv, nn, d, **bf16)  # (B, Hkv, N, d)
        v = torch.randn(bsz, hkv, nn, d, **bf16)  # (B, Hkv, N, d)
        moved = nbytes(q, k) + (nbytes(v) if "obc_key" in stats else 0) + len(stats) * bsz * hq * nn * 4
        yield ("window_attention_stats", f"B={bsz} Hq={hq} Hkv={hkv} w={w} N={nn} d={d} {'+'.join(stats)}",
               lambda q=q, k=k, v=v, s=stats: kernels.window_attention_stats(q, k, v, stats=s, impl="triton"),
               lambda q=q, k=k, v=v, s=stats: kernels.window_attention_stats(q, k, v, stats=s, impl="torch"), moved)

    q = torch.randn(1, hq, n, d, **bf16)  # (B, Hq, N, d)
    k = torch.randn(1, hkv, n, d, **bf16)  # (B, Hkv, N, d)
    yield ("chunked_colsum", f"B=1 Hq={hq} Hkv={hkv} N={n} d={d} chunk=256",
           lambda: kernels.chunked_colsum(q, k, 256, impl="triton"),
           lambda: kernels.chunked_colsum(q, k, 256, impl="torch"), nbytes(q, k) + hq * n * 4)

    x = torch.randn(1, hkv, n, d, device=device)  # (B, H, N, d) fp32 centred keys
    x = x - x.mean(2, keepdim=True)
    phi = torch.randn(d, 48, device=device) / 48**0.5  # (d, k)
    yield ("leverage_scores", f"B=1 H={hkv} N={n} d={d} k=48 fp32",
           lambda: kernels.leverage_scores(x, phi, impl="triton"),
           lambda: kernels.leverage_scores(x, phi, impl="torch"), nbytes(x) + hkv * n * 4)

    keys = torch.randn(hkv, n, d, **bf16)  # (H, N, d)
    values = torch.randn(hkv, n, d, **bf16)  # (H, N, d)
    keep = torch.rand(hkv, n, device=device) < torch.linspace(0.2, 0.8, hkv, device=device)[:, None]  # (H, N)
    kept = int(keep.sum())
    yield ("ragged_compact", f"H={hkv} N={n} d={d} kept={kept / keep.numel():.0%}",
           lambda: kernels.ragged_compact(keys, values, keep, impl="triton"),
           lambda: kernels.ragged_compact(keys, values, keep, impl="torch"), 4 * kept * d * 2 + keep.numel())

    kp, vp, offsets = kernels.ragged_compact(keys, values, keep, impl="torch")  # (T, d), (T, d), (Hkv + 1,)
    qd = torch.randn(hq, d, **bf16)  # (Hq, d)
    yield ("ragged_decode", f"Hq={hq} Hkv={hkv} T={kp.shape[0]} d={d}",
           lambda: kernels.ragged_decode(qd, kp, vp, offsets, impl="triton"),
           lambda: kernels.ragged_decode(qd, kp, vp, offsets, impl="torch"), nbytes(kp, vp) + 2 * nbytes(qd))

    qp = torch.randn(1, hq, 1, d, **bf16)  # (B, Hq, 1, d)
    kpad = keys[None]  # (B, Hkv, L, d)
    vpad = values[None]  # (B, Hkv, L, d)
    mask = keep.repeat_interleave(hq // hkv, 0)[None, :, None, :]  # (B, Hq, 1, L)
    yield ("ragged_decode_padded", f"B=1 Hq={hq} Hkv={hkv} L={n} d={d}",
           lambda: kernels.ragged_decode_padded(qp, kpad, vpad, mask, impl="triton"),
           lambda: kernels.ragged_decode_padded(qp, kpad, vpad, mask, impl="torch"),
           nbytes(kpad, vpad, mask) + 2 * nbytes(qp))


def run_gpu(n: int) -> list[dict]:
    import torch
    from triton.testing import do_bench

    rows = []
    for op, shape, fast, ref, moved in cases(n, "cuda"):
        ms_triton = do_bench(fast, warmup=25, rep=100, return_mode="median")
        ms_torch = do_bench(ref, warmup=5, rep=50, return_mode="median")
        rows.append(dict(op=op, shape=shape, ms_triton=ms_triton, ms_torch=ms_torch, speedup=ms_torch / ms_triton,
                         gbps_triton=moved / ms_triton / 1e6, bytes=moved))
        torch.cuda.empty_cache()
    return rows


def run_smoke() -> list[dict]:
    """Tiny odd shapes through the interpreter; the relative error of each op against its reference."""
    import torch

    from kvcalib import kernels

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    torch.manual_seed(0)
    stats = ("attn", "attn_sq", "obc_key", "obc_cross")
    q, k, v = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 63, 16), torch.randn(1, 2, 63, 16)
    out = {impl: kernels.window_attention_stats(q, k, v, stats=stats, impl=impl) for impl in ("triton", "torch")}
    rows = [dict(op="window_attention_stats", stat=s, rel_err=rel(out["triton"][s], out["torch"][s])) for s in stats]
    qq = torch.randn(1, 6, 63, 16)
    rows.append(dict(op="chunked_colsum", rel_err=rel(kernels.chunked_colsum(qq, k, 16, impl="triton"),
                                                      kernels.chunked_colsum(qq, k, 16, impl="torch"))))
    x, phi = torch.randn(1, 2, 63, 16), torch.randn(16, 48)
    rows.append(dict(op="leverage_scores", rel_err=rel(kernels.leverage_scores(x, phi, impl="triton"),
                                                       kernels.leverage_scores(x, phi, impl="torch"))))
    keep = torch.rand(2, 63) > 0.5
    packed = kernels.ragged_compact(k[0], v[0], keep, impl="triton")
    same = all(torch.equal(a, b) for a, b in zip(packed, kernels.ragged_compact(k[0], v[0], keep, impl="torch")))
    rows.append(dict(op="ragged_compact", rel_err=0.0 if same else 1.0))
    qd = torch.randn(6, 16)
    rows.append(dict(op="ragged_decode", rel_err=rel(kernels.ragged_decode(qd, *packed, impl="triton"),
                                                     kernels.ragged_decode(qd, *packed, impl="torch"))))
    qp, mask = torch.randn(1, 6, 1, 16), torch.rand(1, 6, 1, 63) > 0.3
    out = [kernels.ragged_decode_padded(qp, k, v, mask, impl=impl) for impl in ("triton", "torch")]
    rows.append(dict(op="ragged_decode_padded", rel_err=rel(*out)))
    for r in rows:
        r["ok"] = r["rel_err"] <= 1e-4
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton when it is first imported, just below
    import torch
    import triton

    from kvcalib.kernels._common import interpreter_active

    report = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(), results=[])
    if args.interpret_smoke:
        if not interpreter_active():
            print("triton was imported before TRITON_INTERPRET=1 could be set; run the script in a fresh process")
            return 1
        rows = run_smoke()
        report.update(gpu=False, mode="interpret-smoke", device="cpu (Triton interpreter)", results=rows)
        print(f"{'op':24s} {'stat':10s} {'rel. error':>10s}  ok")
        for r in rows:
            print(f"{r['op']:24s} {r.get('stat', ''):10s} {r['rel_err']:10.2e}  {'yes' if r['ok'] else 'NO'}")
        status = 0 if all(r["ok"] for r in rows) else 1
    elif not torch.cuda.is_available():
        reason = "no CUDA device: the kernel benchmark needs a GPU, nothing was timed"
        print(f"{reason}. (--interpret-smoke runs a tiny correctness check through the Triton interpreter on CPU.)")
        report.update(gpu=False, mode="benchmark", device="cpu", ran=False, reason=reason)
        status = 0
    else:
        rows = run_gpu(args.n)
        report.update(gpu=True, mode="benchmark", device=torch.cuda.get_device_name(), ran=True, results=rows)
        print(f"{'op':24s} {'shape':52s} {'ms triton':>10s} {'ms torch':>10s} {'speed-up':>9s} {'GB/s':>8s}")
        for r in rows:
            print(f"{r['op']:24s} {r['shape']:52s} {r['ms_triton']:10.3f} {r['ms_torch']:10.3f} "
                  f"{r['speedup']:8.1f}x {r['gbps_triton']:8.0f}")
        status = 0
    write_report(report, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
