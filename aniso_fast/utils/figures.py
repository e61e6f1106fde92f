"""Every picture the project writes: image grids (PNG through Pillow) and plots (matplotlib, Agg backend).

One place for figures: the sample CLI, the trainer and the results table all call these. Files are written
atomically (`atomic.py`), so a figure is either the old one or the complete new one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .atomic import atomic_write

__all__ = ["image_grid", "save_image_grid", "plot_schedule", "plot_subspace_values", "plot_samples", "plot_points",
           "plot_fd_vs_nfe"]


def _as_uint8_array(images) -> np.ndarray:
    """uint8 images [B, C, H, W] as a numpy array (a torch tensor or a numpy array)."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"images: expected uint8 [B, C, H, W], got {arr.dtype} of shape {arr.shape}")
    return arr


def image_grid(images, cols: int | None = None, *, rows: int | None = None, column_major: bool = False,
               pad: int = 0, fill: int = 0) -> np.ndarray:
    """uint8 images [B, C, H, W] -> one uint8 canvas [rows*(H+pad), cols*(W+pad), C].

    Give `cols` or `rows` (default: about a square). `column_major` fills columns first (sample i at row
    i mod rows), which lays out classes one per line when sample i has class i mod num_classes and
    rows = num_classes.
    """
    arr = _as_uint8_array(images)
    B, C, H, W = arr.shape
    if rows is not None:
        cols = math.ceil(B / rows)
    cols = cols or math.ceil(math.sqrt(B))
    rows = rows or math.ceil(B / cols)
    canvas = np.full((rows * (H + pad), cols * (W + pad), C), fill, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = (i % rows, i // rows) if column_major else divmod(i, cols)
        canvas[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = img.transpose(1, 2, 0)
    return canvas


def save_image_grid(images, path: str | os.PathLike, cols: int | None = None, *, replace: bool = True) -> Path:
    """uint8 images [B, C, H, W] -> one PNG grid (grayscale for C = 1), written atomically (`replace=False`: never
    over an existing file, `atomic.atomic_write`)."""
    from PIL import Image

    canvas = image_grid(images, cols)
    pil = Image.fromarray(canvas[..., 0] if canvas.shape[2] == 1 else canvas)
    return atomic_write(Path(path), lambda tmp: pil.save(tmp, format="PNG"), replace=replace)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    plt = _plt()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def plot_schedule(schedule, path: str | os.PathLike, title: str,
                  class_names: Sequence[str] | None = None) -> Path:
    """g_k(t) per subspace (log scale; one colour per class, one line style per subspace) and, for K > 1, the
    anisotropy ratio g_0 / g_{K-1} against t; for K = 1, g(t) over its EDM/Karras initialisation."""
    plt = _plt()
    device = schedule.psi.device
    t = torch.linspace(0, schedule.T, 401, dtype=torch.float64, device=device)
    S = schedule.num_classes or 1
    K = schedule.num_subspaces
    init = type(schedule)(1, num_knots=schedule.num_knots, T=schedule.T, g0=schedule.g0)  # its Karras start
    with torch.no_grad():
        g_init = init(t.cpu())[0][:, 0]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    tt = t.cpu()
    ax0.semilogy(tt, g_init, color="0.6", lw=3, alpha=0.5, label="EDM init")
    with torch.no_grad():
        for s in range(S):
            labels = torch.full((len(t),), s, dtype=torch.long, device=device) if schedule.num_classes else None
            g = schedule(t, labels)[0].cpu()
            name = "global" if S == 1 else (class_names[s] if class_names else f"class {s}")
            for k in range(K):
                ax0.semilogy(tt, g[:, k], color=cmap(s % 10), ls=styles[k % 4], lw=1.2,
                             label=name if k == 0 else None)
            ratio = g[:, 0] / g[:, -1] if K > 1 else g[:, 0] / g_init
            ax1.semilogy(tt, ratio, color=cmap(s % 10), lw=1.2, label=name)
    ax0.set_xlabel("t")
    ax0.set_ylabel("g_k(t)" + ("  (solid: k = 0, dashed: k = 1, ...)" if K > 1 else ""))
    ax1.set_xlabel("t")
    ax1.set_ylabel(f"g_0 / g_{K - 1}  (anisotropy ratio g/h)" if K > 1 else "g(t) / g_init(t)")
    ax1.axhline(1.0, color="0.6", lw=0.8)
    ax0.legend(fontsize=7, ncol=2)
    if S > 1:
        ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=90)


def plot_subspace_values(values, path: str | os.PathLike, title: str, ylabel: str,
                         class_names: Sequence[str] | None = None) -> Path:
    """A learned per-subspace value [S, K] (one line per class) against the subspace index k: the process
    families' rates (VSDM's lambda_k, VSMD's c_k)."""
    plt = _plt()
    values = values.detach().double().cpu()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("tab10")
    for s, row in enumerate(values):
        name = "global" if len(values) == 1 else (class_names[s] if class_names else f"class {s}")
        ax.plot(range(len(row)), row, color=cmap(s % 10), lw=1.2, marker="." if len(row) <= 64 else None,
                label=name)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("subspace k")
    ax.set_ylabel(ylabel)
    if len(values) > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=90)


def plot_samples(blocks: Sequence[tuple[str, torch.Tensor, int]], path: str | os.PathLike, title: str) -> Path:
    """One block per row, side by side: uint8 samples [k, C, H, W] with sample i of class i mod num_classes,
    arranged one class per line."""
    plt = _plt()
    lines = max(max(num_classes, 1) for _, _, num_classes in blocks)
    fig, axes = plt.subplots(1, len(blocks), figsize=(2.3 * len(blocks), 1.2 + 0.45 * lines), squeeze=False)
    for ax, (label, images, num_classes) in zip(axes[0], blocks):
        canvas = image_grid(images, rows=max(num_classes, 1), column_major=True, pad=1, fill=255)
        C = canvas.shape[2]
        ax.imshow(canvas[..., 0] if C == 1 else canvas, cmap="gray" if C == 1 else None, vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=110)


def plot_points(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, title: str,
                cols: int | None = None, bounds: tuple[float, float, float, float] | None = None) -> Path:
    """2-D point clouds and paths, one panel each: an array [n, 2] is drawn as dots, [steps, n, 2] as n paths
    (start marked grey, end black). `bounds` = (xmin, xmax, ymin, ymax) for every panel (aspect not forced)."""
    plt = _plt()
    cols = cols or min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, pts) in zip(axes.flat, panels):
        pts = np.asarray(pts)
        if pts.ndim == 2:
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="C0", linewidths=0)
        else:
            for i in range(pts.shape[1]):
                ax.plot(pts[:, i, 0], pts[:, i, 1], lw=0.5, alpha=0.6)
            ax.scatter(pts[0, :, 0], pts[0, :, 1], s=3, color="0.6", linewidths=0)
            ax.scatter(pts[-1, :, 0], pts[-1, :, 1], s=3, color="k", linewidths=0)
        if bounds is not None:
            ax.set_xlim(bounds[0], bounds[1])
            ax.set_ylim(bounds[2], bounds[3])
        ax.set_title(label, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=100)


def plot_fd_vs_nfe(lines: Sequence[tuple[str, Sequence[int], Sequence[float], Sequence[float]]],
                   path: str | os.PathLike, title: str, floor: tuple[float, float] | None = None,
                   groups: Sequence[str] | None = None) -> Path:
    """Frechet distance against NFE (log axes), one line per (label, nfes, fds, standard errors) with error bars,
    and the data floor (value, standard error) as a dashed line over a grey band. Lines of the same `groups`
    entry (e.g. the model) share a colour and differ in line style and marker; the legend sits outside."""
    plt = _plt()
    groups = list(groups) if groups is not None else [label for label, *_ in lines]
    colours = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    cmap = plt.get_cmap("tab10" if len(colours) <= 10 else "tab20")
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "v", "D", "x", "+"]
    fig, ax = plt.subplots(figsize=(13, 6.5))
    seen: dict[str, int] = {}
    all_nfes = sorted({int(k) for _, nfes, _, _ in lines for k in nfes})
    for (label, nfes, fds, ses), group in zip(lines, groups):
        j = seen[group] = seen.get(group, -1) + 1
        ax.errorbar(list(nfes), list(fds), yerr=list(ses), color=cmap(colours[group] % cmap.N),
                    ls=styles[j % len(styles)], marker=markers[j % len(markers)], ms=3.5, lw=1.2, capsize=2,
                    label=label)
    if floor is not None:
        value, se = floor
        ax.axhline(value, color="k", lw=1, ls="--", label=f"data floor {value:.2f} ± {se:.2f}")
        ax.axhspan(value - se, value + se, color="0.85", alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if all_nfes:
        labelled = []  # a label only where it clears the previous one on the log axis (199 beside 200 would not)
        for k in sorted(all_nfes):
            if not labelled or k / labelled[-1] > 1.1:
                labelled.append(k)
        ax.set_xticks(labelled)
        ax.set_xticklabels([str(k) for k in labelled])
        ax.minorticks_off()
    ax.set_xlabel("NFE (network calls per sample)")
    ax.set_ylabel("Frechet distance (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(lines) <= 40 else 2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=110)
