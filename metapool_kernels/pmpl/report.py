"""What a user reads after a run: the genotype table, the accuracy table and the plot of each
layer's softmax(α) (π of Eq. 1) over the search, with the progressive early-stopping events of
Eq. 4 marked."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: Optional[str] = None) -> str:
    """A plain-text table; numbers right-aligned, everything else left-aligned."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in rows if r[i] is not None) and rows for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(v: object) -> bool:
    if isinstance(v, (int, float)):
        return True
    try:
        float(str(v).rstrip("%").replace(",", ""))
        return True
    except ValueError:
        return False


def genotype_table(genotype: Sequence[str], probs: Sequence[Sequence[float]], candidates_per_layer: Sequence[Sequence[str]],
                   channels: Sequence[int], events: Sequence[Dict], steps_per_epoch: int) -> str:
    """One row per Meta-Pooling layer: its op, π of that op, and when Eq. 4 fixed it (or argmax)."""
    by_layer = {e["layer"]: e for e in events}
    rows = []
    for i, op in enumerate(genotype):
        pi = probs[i][list(candidates_per_layer[i]).index(op)]
        if i in by_layer:
            e = by_layer[i]
            how = f"fixed at step {e['step']} (epoch {e['step'] / max(steps_per_epoch, 1):.2f}), margin {e['margin']:.3f}"
        else:
            how = "argmax at the end of the search"
        rows.append((i, channels[i], op, f"{pi:.3f}", how))
    return format_table(("layer", "channels", "op", "π(op)", "decided"), rows, title="Genotype")


def plot_alpha_history(history: List[Dict], events: Sequence[Dict], candidates: Sequence[str], path: Path | str,
                       steps_per_epoch: int, title: str = "PMPL search: π = softmax(α) per layer") -> Path:
    """A grid with one panel per layer: π of every candidate against the epoch, a marker where the
    layer was fixed. ``history`` holds ``{"step": s, "probs": [[π per op] per layer]}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layers = len(history[0]["probs"]) if history else 0
    cols = min(6, max(1, n_layers))
    rows = max(1, -(-n_layers // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.0 * rows + 0.8), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    spe = max(steps_per_epoch, 1)
    x = [h["step"] / spe for h in history]
    colours = plt.get_cmap("tab10").colors
    by_layer = {e["layer"]: e for e in events}
    y_top = max([max(max(p) for p in h["probs"]) for h in history] + [0.3]) * 1.1
    for li in range(rows * cols):
        ax = axes[li // cols][li % cols]
        if li >= n_layers:
            ax.axis("off")
            continue
        for k, name in enumerate(candidates):
            ax.plot(x, [h["probs"][li][k] for h in history], color=colours[k % 10], lw=1.3, label=name)
        e = by_layer.get(li)
        if e is not None:
            xe = e["step"] / spe
            ax.axvline(xe, color="black", ls="--", lw=0.9)
            ax.plot([xe], [e["prob"]], marker="*", ms=11, color=colours[list(candidates).index(e["op"]) % 10],
                    markeredgecolor="black", zorder=5)
            ax.set_title(f"layer {li}: {e['op']} @ {xe:.2f} ep", fontsize=9)
        else:
            final = history[-1]["probs"][li]
            ax.set_title(f"layer {li}: not fixed, argmax {candidates[max(range(len(final)), key=final.__getitem__)]}",
                         fontsize=9, color="dimgray")
        ax.set_ylim(0, y_top)
        ax.grid(alpha=0.3)
        if li % cols == 0:
            ax.set_ylabel("π")
        if li // cols == rows - 1 or li + cols >= n_layers:
            ax.set_xlabel("epoch")
            ax.tick_params(labelbottom=True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(candidates), frameon=False, fontsize=9)
    fig.suptitle(title + "  (★ and dashed line: the layer is fixed by Eq. 4)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
