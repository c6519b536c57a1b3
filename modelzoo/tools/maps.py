"""Pictures of what a model says about genomes, drawn with matplotlib (no display needed).

- ``draw_map(vectors, labels, path, title)``: every genome a dot on a 2-D t-SNE map of its
  vector (an embedding, say), coloured by its label, with a legend of the groups and their
  sizes; unlabelled genomes (``NO_LABEL``) in grey. Deterministic (fixed random state).
- ``draw_log_probs(log_probs, path, title, marked)``: a genome's per-codon log-probabilities
  along it, with chosen codons (mutations against a reference, say) marked and named.

matplotlib and scikit-learn are imported inside the functions: ``import modelzoo`` stays light.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

NO_LABEL = "(none)"
MAX_GROUPS = 18  # labels with a colour of their own; rarer ones share one "other" colour
RANDOM_STATE = 0
GREY = "#b0b0b0"  # unlabelled
OTHER = "#606060"  # the rarer labels past MAX_GROUPS


def project(vectors: np.ndarray, random_state: int = RANDOM_STATE) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``vectors`` and the method's name: t-SNE (perplexity up to
    15, PCA start), or PCA when there are too few rows for t-SNE (fewer than 5)."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x.reshape(len(x), -1)
    if len(x) < 5:
        centred = x - x.mean(0)
        if len(x) < 2 or not centred.any():
            return np.zeros((len(x), 2)), "PCA"
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))), "PCA"
    from sklearn.manifold import TSNE

    perplexity = min(15.0, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state)
    return tsne.fit_transform(x), "t-SNE"


def _groups(labels: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The legend's groups, most frequent first (ties by name; NO_LABEL and "other" last), and
    the group of each label."""
    counts = Counter(labels)
    named = sorted((g for g in counts if g != NO_LABEL), key=lambda g: (-counts[g], g))
    keep = named if len(named) <= MAX_GROUPS else named[: MAX_GROUPS - 1]
    group_of = {g: g for g in keep}
    rest = named[len(keep):]
    if rest:
        other = f"other ({len(rest)} labels)"
        group_of.update({g: other for g in rest})
        keep.append(other)
    if NO_LABEL in counts:
        group_of[NO_LABEL] = NO_LABEL
        keep.append(NO_LABEL)
    return keep, group_of


def _palette() -> list[str]:
    """18 colours told apart at a glance: tab10's strong ones, then tab20's light ones (neither
    grey: grey means no label)."""
    import matplotlib

    strong = [c for k, c in enumerate(matplotlib.colormaps["tab10"].colors) if k != 7]
    light = [c for k, c in enumerate(matplotlib.colormaps["tab20"].colors) if k % 2 and k != 15]
    return [matplotlib.colors.to_hex(c) for c in strong + light]


def _colours(groups: list[str]) -> dict[str, str]:
    palette = iter(_palette())
    return {g: GREY if g == NO_LABEL else OTHER if g.startswith("other (") else next(palette) for g in groups}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # not pyplot: no display, no global backend choice

    return Figure(figsize=(width, height), dpi=150)


def draw_map(vectors: np.ndarray, labels: Sequence[str], path: str | Path, title: str,
             random_state: int = RANDOM_STATE) -> str:
    """Draw the 2-D map of ``vectors`` (one row per genome), coloured by ``labels`` (one per
    row; ``NO_LABEL`` for none), to the PNG ``path``. Returns the method used ("t-SNE", or
    "PCA" for fewer than 5 genomes), which the title gets appended."""
    labels = [str(label) for label in labels]
    if len(labels) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(labels)} labels")
    xy, method = project(vectors, random_state)
    groups, group_of = _groups(labels)
    colours = _colours(groups)
    members = {g: [i for i, label in enumerate(labels) if group_of[label] == g] for g in groups}

    fig = _figure(9, 6.5)
    ax = fig.add_subplot()
    for g in [NO_LABEL] + [g for g in groups if g != NO_LABEL]:  # the unlabelled underneath
        if members.get(g):
            at = xy[members[g]]
            ax.scatter(at[:, 0], at[:, 1], s=46, color=colours[g], edgecolors="white", linewidths=0.6,
                       alpha=0.9 if g != NO_LABEL else 0.7, zorder=1 if g == NO_LABEL else 2,
                       label=f"{g} ({len(members[g])})")
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(f"{g} ({len(members[g])})") for g in groups if members.get(g)]
    ax.legend([handles[k] for k in order], [names[k] for k in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=10, markerscale=1.2)
    ax.set_title(f"{title}\n{method} of {len(labels)} genomes", fontsize=11)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    return method


def draw_log_probs(log_probs: np.ndarray, path: str | Path, title: str,
                   marked: Sequence[tuple[int, str]] = (), marked_label: str = "marked", max_names: int = 12) -> None:
    """Draw a genome's per-codon log-probabilities (NaN: not scored) along it to the PNG
    ``path``, each codon a dot, with the ``marked`` (codon index, name) codons in red (in the
    legend as ``marked_label``) and the ``max_names`` least likely of them named. A marked codon
    that is not scored is drawn at the bottom."""
    values = np.asarray(log_probs, dtype=np.float64)
    scored = np.flatnonzero(np.isfinite(values))
    fig = _figure(12, 4.2)
    ax = fig.add_subplot()
    ax.scatter(scored, values[scored], s=3, color="#4a6fa5", alpha=0.45, linewidths=0, label="codon",
               rasterized=True)
    if len(scored) >= 50:  # the running median shows where the model is sure and where not
        width = max(25, len(values) // 200)
        ax.plot(scored, _running_median(values[scored], width), color="#1f3b63", lw=0.9,
                label=f"running median ({width} codons)")
    shown = [(i, name) for i, name in marked if 0 <= i < len(values)]
    if shown:
        at = np.array([i for i, _ in shown])
        y = np.where(np.isfinite(values[at]), values[at], np.nanmin(values) if len(scored) else 0.0)
        ax.scatter(at, y, s=40, color="#d62728", marker="v", zorder=3, label=f"{marked_label} ({len(shown)})")
        for k in np.argsort(y, kind="stable")[:max_names]:
            ax.annotate(shown[k][1], (at[k], y[k]), xytext=(6, -3), textcoords="offset points", fontsize=8,
                        color="#d62728", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax.margins(x=0.01, y=0.06)
    ax.set_xlabel("codon index (0-based, in the model's reading frame)")
    ax.set_ylabel("log-probability (nats)")
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})


def _running_median(values: np.ndarray, width: int) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    half = width // 2
    padded = np.pad(values, (half, width - 1 - half), mode="edge")
    return np.median(sliding_window_view(padded, width), axis=1)
