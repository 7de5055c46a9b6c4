"""The fidelity curve of a profile as a PNG (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import io

from kvcalib.service.views import ProfileView


def curve_png(prof: ProfileView) -> bytes:
    """Fidelity per compression ratio, with the tolerance τ and the profile's r* marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.subplots()
    ax.plot([c.ratio for c in prof.curve], [c.fidelity for c in prof.curve], "o-", label="fidelity")
    ax.axhline(prof.tolerance, color="grey", ls="--", lw=1, label=f"τ = {prof.tolerance:g}")
    ax.axvline(prof.r_star, color="tab:red", ls=":", lw=1.5, label=f"r* = {prof.r_star:.2f}")
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("fidelity")
    ax.set_xlim(0, 1)
    ax.set_title(f"{prof.document_hash[:12]} · {prof.model} · {prof.method}/{prof.allocator}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
