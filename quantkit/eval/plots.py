"""Pictures a person would rather look at than read."""

from __future__ import annotations

import io


def layer_error_png(layers: list[dict], title: str) -> bytes:
    """Per-layer error of a quantization report, one line per linear kind
    (q_proj, ..., down_proj) across the blocks; PNG bytes.

    Uses the relative output error where the algorithm measured it (it saw
    calibration activations), else the relative weight error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "output_rel_error" if all("output_rel_error" in r for r in layers) else "weight_rel_error"
    series: dict[str, list[tuple[int, float]]] = {}
    for position, r in enumerate(layers):
        parts = r["name"].split(".")
        block = next((int(p) for p in parts if p.isdigit()), position)
        series.setdefault(parts[-1], []).append((block, r[key]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for kind, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
