"""TOVA and KeyDiff against plain-Python versions of their published formulas, with every allocator, through the
engine, in calibration and in the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers import SCORERS, get_scorer
from tests.support import assert_feeds_allocator

INF = float("inf")


def random_capture(n: int, layers: int = 2, hkv: int = 2, group: int = 3, d: int = 8, seed: int = 0) -> Capture:
    gen = torch.Generator().manual_seed(seed)
    return Capture(input_ids=torch.arange(n), keys=torch.randn(layers, hkv, n, d, generator=gen) * 1.5,
                   values=torch.randn(layers, hkv, n, d, generator=gen),
                   keys_pre=torch.randn(layers, hkv, n, d, generator=gen),
                   queries=torch.randn(layers, hkv * group, n, d, generator=gen) * 1.5, last_logits=torch.zeros(4))


def naive_tova(cap: Capture) -> list:
    """TOVA (Oren et al. 2024): the last token's attention softmax(q_{N−1}·k_j/√d) over all N keys, averaged over all
    query heads of the layer, the same for every kv head; the last position kept."""
    n_layers, hkv, n, d = cap.keys.shape
    hq = cap.queries.shape[1]
    out = []
    for l in range(n_layers):
        acc = [0.0] * n
        for qh in range(hq):
            q = cap.queries[l, qh, n - 1].tolist()
            ks = cap.keys[l, qh // (hq // hkv)].tolist()
            z = [sum(a * b for a, b in zip(q, k)) / math.sqrt(d) for k in ks]
            m = max(z)
            e = [math.exp(x - m) for x in z]
            acc = [a + x / sum(e) / hq for a, x in zip(acc, e)]
        out.append([acc[:-1] + [INF] for _ in range(hkv)])
    return out


def naive_keydiff(cap: Capture) -> list:
    """KeyDiff (Park et al. 2025): s_i = −cos(k_i, a), a = mean_j k_j/‖k_j‖, per (layer, kv head)."""
    n_layers, hkv, n, d = cap.keys.shape
    out = []
    for l in range(n_layers):
        heads = []
        for h in range(hkv):
            ks = cap.keys[l, h].double().tolist()
            norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
            a = [sum(k[c] / norm(k) for k in ks) / n for c in range(d)]
            heads.append([-sum(x * y for x, y in zip(k, a)) / (norm(k) * norm(a)) for k in ks])
        out.append(heads)
    return out


def assert_scores(got: torch.Tensor, want: list):
    want = torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [9, 37])
def test_tova_matches_naive(n):
    cap = random_capture(n, seed=n)
    assert_scores(get_scorer("tova").score(cap), naive_tova(cap))


@pytest.mark.parametrize("n", [9, 37])
def test_keydiff_matches_naive(n):
    cap = random_capture(n, seed=50 + n)
    got = get_scorer("keydiff").score(cap)
    assert_scores(got, naive_keydiff(cap))
    assert bool(torch.isfinite(got).all())  # nothing protected


def test_registered_and_parameter_free():
    assert {"tova", "keydiff"} <= set(SCORERS)
    assert get_scorer("tova").params() == {} and get_scorer("keydiff").params() == {}


@pytest.mark.parametrize("name", ["tova", "keydiff"])
@pytest.mark.parametrize("allocator", ["uniform", "adakv", "lava"])
def test_peers_feed_every_allocator(short_capture, name, allocator):
    assert_feeds_allocator(short_capture, name, allocator)


@pytest.mark.parametrize("name", ["tova", "keydiff"])
def test_peers_run_through_the_engine_and_calibration(engine, name):
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.calib.data.documents import load_essays

    text = load_essays()["aord"][:700]
    res = engine.run(text, "What is this essay about?", method=name, budget=Budget(ratio=0.5), allocator="adakv",
                     max_new_tokens=4)
    assert res.method == name and abs(res.ratio - 0.5) < 0.01
    cal = calibrate(engine, text, CalibrationConfig(method=name, ratios=(0.3, 0.7), n_probes=1))
    assert len(cal.fidelity) == 2 and 0.0 <= cal.r_star <= 0.7


def test_peers_listed_by_the_cli():
    from typer.testing import CliRunner

    from kvcalib.cli import app

    out = CliRunner().invoke(app, ["methods"])
    assert out.exit_code == 0, out.output
    assert "tova" in out.output and "keydiff" in out.output
