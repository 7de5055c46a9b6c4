"""kvcalib.kernels: every Triton kernel against its torch reference, the references against plain python loops,
the dispatch rule, and — without a GPU — compilation of the kernels for sm_90.

The Triton-vs-reference comparisons run under Triton's CPU interpreter in ONE fresh process (``python
tests/test_kernels.py --worker`` with ``TRITON_INTERPRET=1``): Triton reads that variable when each ``@triton.jit``
function is decorated, its own standard library included, i.e. when ``triton`` is first imported — setting it in
an already running pytest process (where another module may have imported triton) would have no effect, and this
pytest process keeps compiled-mode Triton for the sm_90 compile check and the CUDA test.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

from kvcalib import kernels
from kvcalib.kernels import naive

STATS = naive.STATS
RESULT_MARK = "KVCALIB-KERNEL-RESULTS "

# ----------------------------------------------------------------------------------------------------------------
# Interpreter cases: each returns [(label, error, tolerance)]; run by the worker process.
# ----------------------------------------------------------------------------------------------------------------

CASES = {}


def case(fn):
    """Register an interpreter case under its function name."""
    CASES[fn.__name__] = fn
    return fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|, NaNs required in the same places."""
    out, ref = out.double(), ref.double()
    if not torch.equal(out.isnan(), ref.isnan()):
        return math.inf
    out, ref = out.nan_to_num(0.0), ref.nan_to_num(0.0)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def qkv(bsz, hq, hkv, w, n, d, dtype=torch.float32, seed=0):
    """Seeded random queries (B, Hq, w, d), keys and values (B, Hkv, N, d)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, w, d, generator=gen).to(dtype)  # (B, Hq, w, d)
    k = torch.randn(bsz, hkv, n, d, generator=gen).to(dtype)  # (B, Hkv, N, d)
    v = torch.randn(bsz, hkv, n, d, generator=gen).to(dtype)  # (B, Hkv, N, d)
    return q, k, v


@case
def window_stats():
    from kvcalib.kernels.window_attn import window_attention_stats

    checks = []
    shapes = [(1, 6, 2, 5, 63, 16, None), (1, 6, 2, 8, 130, 64, 3), (2, 2, 2, 8, 130, 16, 2),
              (1, 8, 1, 33, 63, 16, None), (1, 2, 1, 130, 140, 16, 2)]  # G=8: 4 row blocks; w > 128 rows
    for bsz, hq, hkv, w, n, d, splits in shapes:
        q, k, v = qkv(bsz, hq, hkv, w, n, d)
        ref = naive.window_attention_stats(q, k, v, stats=STATS)
        out = window_attention_stats(q, k, v, stats=STATS, num_splits=splits)
        tag = f"B{bsz} Hq{hq} Hkv{hkv} w{w} N{n} d{d} splits={splits or 'auto'}"
        checks += [(f"{s} {tag}", rel_err(out[s], ref[s]), 2e-6) for s in STATS]
    q, k, v = qkv(1, 6, 2, 5, 63, 16, dtype=torch.float16, seed=1)
    ref = naive.window_attention_stats(q, k, v, scale=0.3, stats=STATS)
    out = kernels.window_attention_stats(q, k, v, scale=0.3, stats=STATS, impl="triton")
    checks += [(f"{s} fp16 scale0.3", rel_err(out[s], ref[s]), 1e-3) for s in STATS]
    out = kernels.window_attention_stats(q, k, stats=("attn_sq",), impl="triton")
    checks.append(("only the requested statistics", float(sorted(out) != ["attn_sq"]), 0.0))
    return checks


@case
def chunked_colsum():
    from kvcalib.kernels.chunked_attn import chunked_colsum as colsum

    checks = []
    for n, d, chunk, scale in [(130, 16, 16, 1.0), (130, 16, 32, 0.25), (63, 64, 256, 0.125)]:
        q, k, _ = qkv(1, 6, 2, n, n, d, seed=2)
        ref = naive.chunked_colsum(q, k, chunk=chunk, scale=scale)
        checks.append((f"N{n} d{d} chunk{chunk} scale{scale}", rel_err(colsum(q, k, chunk, scale), ref), 2e-6))
    q, k, _ = qkv(1, 2, 1, 40, 40, 16, dtype=torch.float16, seed=3)
    checks.append(("fp16 via dispatch", rel_err(kernels.chunked_colsum(q, k, chunk=16, impl="triton"),
                                                 naive.chunked_colsum(q, k, chunk=16)), 1e-3))
    return checks


@case
def leverage():
    from kvcalib.kernels.leverage import _sketch_quadform_kernel, leverage_scores

    gen = torch.Generator().manual_seed(4)
    checks = []
    for bsz, h, n, d, splits in [(1, 2, 130, 64, None), (2, 1, 63, 16, 2)]:  # d=16 < k=48: singular Gram, ridge
        x = torch.randn(bsz, h, n, d, generator=gen) * torch.linspace(0.1, 3.0, d)  # (B, H, N, d) anisotropic
        x = x - x.mean(2, keepdim=True)
        phi = torch.randn(d, 48, generator=gen) / 48**0.5  # (d, k)
        ref = naive.leverage_scores(x, phi)
        checks.append((f"B{bsz} H{h} N{n} d{d} splits={splits or 'auto'}",
                       rel_err(leverage_scores(x, phi, num_splits=splits), ref), 5e-5))
    # the pseudo-inverse branch: (s M)·s with a general k × k matrix M
    x = torch.randn(1, 2, 70, 16, generator=gen)  # (B, H, N, d)
    phi = torch.randn(16, 48, generator=gen)  # (d, k)
    mat = torch.randn(2, 48, 48, generator=gen)  # (B·H, k, k)
    out = torch.empty(1, 2, 70)
    _sketch_quadform_kernel[(2, 2)](x, phi, mat, out, *x.stride(), 2, 70, 16, 48, SQUARE=False, BLOCK_N=64,
                                    BLOCK_D=16, BLOCK_K=64, F32_DOT="tf32x3")
    s = x @ phi  # (B, H, N, k)
    ref = torch.einsum("bhnk,bhkl,bhnl->bhn", s, mat.view(1, 2, 48, 48), s)
    checks.append(("quadratic form with a general matrix", rel_err(out, ref), 1e-5))
    return checks


@case
def ragged_compact():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(130, 3, 16, generator=gen).transpose(0, 1)  # (H, N, d), non-contiguous
    values = torch.randn(3, 130, 16, generator=gen).half()  # (H, N, d)
    keep = torch.rand(3, 130, generator=gen) > 0.6  # (H, N)
    keep[1] = False
    keep[2] = True
    checks = []
    for ks, vs in [(keys, values.float()), (keys.half(), values)]:
        out = kernels.ragged_compact(ks, vs, keep, impl="triton")
        ref = naive.ragged_compact(ks, vs, keep)
        for name, a, b in zip(("keys", "values", "offsets"), out, ref):
            checks.append((f"{name} {a.dtype}", 0.0 if a.dtype == b.dtype and torch.equal(a, b) else 1.0, 0.0))
    none = kernels.ragged_compact(keys, values, torch.zeros(3, 130, dtype=torch.bool), impl="triton")
    checks.append(("nothing kept", float(none[0].shape != (0, 16) or none[2].tolist() != [0, 0, 0, 0]), 0.0))
    return checks


@case
def ragged_decode():
    from kvcalib.kernels.ragged import ragged_decode as decode

    gen = torch.Generator().manual_seed(6)
    checks = []
    for hq, hkv, d, dtype, tol in [(6, 2, 16, torch.float32, 2e-6), (6, 3, 64, torch.float32, 2e-6),
                                   (6, 2, 16, torch.float16, 2e-3)]:
        kv = torch.randn(hkv, 130, d, generator=gen).to(dtype)  # (Hkv, N, d)
        keep = torch.rand(hkv, 130, generator=gen) > 0.5
        if hkv == 3:
            keep[1] = False  # a head without entries attends to nothing: zeros
        k, v, offsets = naive.ragged_compact(kv, kv.flip(-1), keep)  # (T, d), (T, d), (Hkv + 1,)
        q = torch.randn(hq, d, generator=gen).to(dtype)  # (Hq, d)
        ref = naive.ragged_decode(q, k, v, offsets, scale=0.2)
        for splits in (None, 3):
            checks.append((f"Hq{hq} Hkv{hkv} d{d} {dtype} splits={splits or 'auto'}",
                           rel_err(decode(q, k, v, offsets, 0.2, num_splits=splits), ref), tol))
    return checks


@case
def ragged_decode_padded():
    from kvcalib.kernels.ragged import ragged_decode_padded as decode

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 1, 16, generator=gen)  # (B, Hq, 1, d)
    _, k, v = qkv(2, 6, 2, 1, 130, 16, seed=8)  # (B, Hkv, L, d)
    full = torch.rand(2, 6, 1, 130, generator=gen) > 0.3  # (B, Hq, 1, L)
    full[1, 4] = False  # a fully masked row: NaN, like the reference's softmax over nothing
    checks = []
    for name, mask in [("per head", full), ("broadcast", torch.rand(1, 1, 1, 130, generator=gen) > 0.5),
                       ("per kv group", full[:, ::3].repeat_interleave(3, dim=1))]:
        ref = naive.ragged_decode_padded(q, k, v, mask)
        for splits in (None, 3):
            checks.append((f"{name} splits={splits or 'auto'}", rel_err(decode(q, k, v, mask, num_splits=splits), ref),
                           2e-6))
    qh, kh, vh = q.half(), k.half(), v.half()
    checks.append(("fp16 via dispatch", rel_err(kernels.ragged_decode_padded(qh, kh, vh, full, impl="triton"),
                                                naive.ragged_decode_padded(qh, kh, vh, full)), 2e-3))
    return checks


def sm90_launches():
    """Launch every kernel once with realistic shapes (d=128, w=32, GQA 4:1, 16-bit operands — fp16 here, since
    bf16 CPU tensors are fed to the interpreter as fp32) and return the launches as (module, name, signature,
    constexprs, num_warps)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    launches = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args)) | {k: a for k, a in kwargs.items() if k in params}
        const = {p: bound[p] for p, spec in params.items() if "constexpr" in str(spec.annotation)}
        sig = {p: "constexpr" if p in const else mangle_type(bound[p]) for p in params}
        launches.append([self.fn.__module__, self.fn.__name__, sig, const, kwargs.get("num_warps", 4)])
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        h = torch.float16
        q, k, v = qkv(1, 8, 2, 32, 70, 128, dtype=h)
        kernels.window_attention_stats(q, k, v, stats=("attn",), impl="triton")
        kernels.window_attention_stats(q, k, v, stats=STATS, impl="triton")
        kernels.chunked_colsum(torch.randn(1, 8, 70, 128, dtype=h), k, chunk=256, impl="triton")
        kernels.leverage_scores(torch.randn(1, 2, 70, 128), torch.randn(128, 48), impl="triton")
        keep = torch.rand(2, 70) > 0.5
        kernels.ragged_compact(k[0], v[0], keep, impl="triton")
        kp, vp, offsets = naive.ragged_compact(k[0], v[0], keep)
        kernels.ragged_decode(torch.randn(8, 128, dtype=h), kp, vp, offsets, impl="triton")
        kernels.ragged_decode_padded(torch.randn(1, 8, 1, 128, dtype=h), k, v, torch.rand(1, 8, 1, 70) > 0.5,
                                     impl="triton")
    finally:
        InterpretedFunction.run = run
    unique = {json.dumps(x, sort_keys=True): x for x in launches}
    return list(unique.values())


def worker() -> None:
    """Run under the interpreter and print two result lines (JSON) for the parent test process: the sm_90 launch
    list first (so that the parent compiles while the cases run), then the results of every case."""
    import numpy as np

    np.seterr(all="ignore")  # NaN rows are expected in the fully masked decode case
    try:
        launches = {"launches": sm90_launches()}
    except Exception:  # reported by the compile test
        launches = {"error": traceback.format_exc()}
    print(RESULT_MARK + json.dumps({"sm90_launches": launches}), flush=True)
    results = {}
    for name, fn in CASES.items():
        try:
            results[name] = {"checks": fn()}
        except Exception:  # reported by the test of that case
            results[name] = {"error": traceback.format_exc()}
    print(RESULT_MARK + json.dumps(results), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


class Worker:
    """The interpreter worker process (``--worker``) and the results it has printed so far."""

    def __init__(self, proc: subprocess.Popen, stderr):
        self.proc, self.stderr, self.results = proc, stderr, {}

    def result(self, key: str) -> dict:
        while key not in self.results:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.stderr.seek(0)
                pytest.fail(f"interpreter worker exited (rc {self.proc.returncode}) before reporting {key}:\n"
                            f"{self.stderr.read()[-4000:]}")
            if line.startswith(RESULT_MARK):
                self.results.update(json.loads(line[len(RESULT_MARK):]))
        res = self.results[key]
        assert "error" not in res, res["error"]
        return res


@pytest.fixture(scope="module")
def interpreted():
    """One worker process per test session, running while the tests consume its results."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        try:
            yield Worker(proc, stderr)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_kernels_compile_for_sm90(interpreted):
    """The interpreter accepts programs the compiler rejects: compile every kernel, in the configurations the
    wrappers pick for realistic shapes, to sm_90 cubin (no GPU needed). Runs while the worker runs the cases."""
    from kvcalib.kernels._common import interpreter_active

    if interpreter_active():
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1 at import)")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = set()
    for module, name, sig, const, num_warps in interpreted.result("sm90_launches")["launches"]:
        fn = getattr(importlib.import_module(module), name)
        sig = {p: t.replace("fp16", "bf16") for p, t in sig.items()}  # models run in bf16
        options = {"num_warps": num_warps, "enable_fp_fusion": True}  # Triton's default, stated to skip a warning
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], f"{name} {const}"
        names.add(name)
    assert len(names) == 9, sorted(names)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_under_interpreter(interpreted, name):
    bad = [f"{label}: error {err:.3g} > {tol:.1g}" for label, err, tol in interpreted.result(name)["checks"]
           if not err <= tol]
    assert not bad, "\n".join(bad)


def python_window_stats(q, k, v, scale):
    """All four window statistics with plain python loops over (head, query, key), in float64."""
    bsz, hq, w, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    out = {s: torch.zeros(bsz, hq, n, dtype=torch.float64) for s in STATS}
    for b in range(bsz):
        for h in range(hq):
            kh = h // (hq // hkv)
            for t in range(w):
                seen = range(n - w + t + 1)
                z = [scale * sum(float(q[b, h, t, c]) * float(k[b, kh, j, c]) for c in range(d)) for j in seen]
                top = max(z)
                e = [math.exp(x - top) for x in z]
                a = [x / sum(e) for x in e]
                o = [sum(a[j] * float(v[b, kh, j, c]) for j in seen) for c in range(d)]
                for j in seen:
                    vj = [float(v[b, kh, j, c]) for c in range(d)]
                    dist = sum((vj[c] - o[c]) ** 2 for c in range(d))
                    vn_minus_vo = sum(vj[c] * vj[c] - vj[c] * o[c] for c in range(d))
                    out["attn"][b, h, j] += a[j]
                    out["attn_sq"][b, h, j] += a[j] ** 2
                    out["obc_key"][b, h, j] += (a[j] * z[j]) ** 2 * dist
                    out["obc_cross"][b, h, j] += a[j] ** 2 * z[j] * vn_minus_vo
    return out


def test_naive_window_stats_matches_python_loop():
    q, k, v = qkv(2, 4, 2, 3, 6, 4, seed=9)
    ref = python_window_stats(q, k, v, scale=0.7)
    out = naive.window_attention_stats(q, k, v, scale=0.7, stats=STATS)
    for s in STATS:
        torch.testing.assert_close(out[s].double(), ref[s], rtol=1e-5, atol=1e-6, msg=s)


def test_naive_chunked_colsum_and_decode_match_python_loops():
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 4, 7, 3, generator=gen)  # (B, Hq, N, d)
    k = torch.randn(2, 2, 7, 3, generator=gen)  # (B, Hkv, N, d): GQA groups of 2
    ref = torch.zeros(2, 4, 7)
    for b in range(2):
        for h in range(4):
            for i in range(7):
                c0 = i // 3 * 3
                cols = range(c0, min(c0 + 3, 7))
                e = [math.exp(0.5 * float(q[b, h, i] @ k[b, h // 2, j])) for j in cols]
                for j, x in zip(cols, e):
                    ref[b, h, j] += x / sum(e)
    torch.testing.assert_close(naive.chunked_colsum(q, k, chunk=3, scale=0.5), ref)
    torch.testing.assert_close(naive.chunked_colsum(q[..., :6, :], k[..., :6, :], chunk=3, scale=0.5)[0, 0, :3],
                               ref[0, 0, :3])  # whole chunks only

    v = torch.randn(5, 3, generator=gen)  # (T, d)
    offsets = torch.tensor([0, 2, 5])
    qd = torch.randn(4, 3, generator=gen)  # (Hq, d)
    for h in range(4):
        s, e = offsets[h // 2], offsets[h // 2 + 1]
        w = torch.softmax(torch.stack([qd[h] @ k[0, 0, j] * 3**-0.5 for j in range(s, e)]), 0)
        torch.testing.assert_close(naive.ragged_decode(qd, k[0, 0, :5], v, offsets)[h], w @ v[s:e])


def test_dispatch_rule_on_cpu():
    q, k, v = qkv(1, 4, 2, 3, 20, 8, seed=11)
    ref = naive.window_attention_stats(q, k, v, stats=STATS)
    for impl in ("auto", "torch"):
        out = kernels.window_attention_stats(q, k, v, stats=STATS, impl=impl)
        assert all(torch.equal(out[s], ref[s]) for s in STATS)
    with pytest.raises(ValueError, match="impl"):
        kernels.chunked_colsum(q, k, impl="cuda")


def test_triton_on_cpu_needs_the_interpreter():
    from kvcalib.kernels._common import interpreter_active

    if interpreter_active():
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1 at import)")
    q = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.ragged_decode(q, torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 4]), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_dispatch_matches_reference(dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    q, k, v = (t.cuda() for t in qkv(2, 8, 2, 32, 1000, 128, dtype=dtype, seed=12))
    ref = kernels.window_attention_stats(q, k, v, stats=STATS, impl="torch")
    out = kernels.window_attention_stats(q, k, v, stats=STATS)
    for s in STATS:
        assert rel_err(out[s], ref[s]) <= tol, s
    qq = torch.randn(2, 8, 1000, 128, device="cuda", dtype=dtype)  # (B, Hq, N, d)
    for chunk in (256, 96):
        assert rel_err(kernels.chunked_colsum(qq, k, chunk), kernels.chunked_colsum(qq, k, chunk, impl="torch")) <= tol
    x = torch.randn(2, 2, 1000, 128, device="cuda")  # (B, H, N, d)
    x = x - x.mean(2, keepdim=True)
    phi = torch.randn(128, 48, device="cuda") / 48**0.5
    assert rel_err(kernels.leverage_scores(x, phi), kernels.leverage_scores(x, phi, impl="torch")) <= 1e-3
    keep = torch.rand(2, 1000, device="cuda") > 0.5
    keep[1, :] = False
    packed = kernels.ragged_compact(k[0], v[0], keep)
    assert all(torch.equal(a, b) for a, b in zip(packed, kernels.ragged_compact(k[0], v[0], keep, impl="torch")))
    qd = torch.randn(8, 128, device="cuda", dtype=dtype)  # (Hq, d)
    assert rel_err(kernels.ragged_decode(qd, *packed), kernels.ragged_decode(qd, *packed, impl="torch")) <= tol
    qp = torch.randn(2, 8, 1, 128, device="cuda", dtype=dtype)  # (B, Hq, 1, d)
    mask = torch.rand(2, 8, 1, 1000, device="cuda") > 0.2
    assert rel_err(kernels.ragged_decode_padded(qp, k, v, mask),
                   kernels.ragged_decode_padded(qp, k, v, mask, impl="torch")) <= tol


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
