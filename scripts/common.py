"""Helpers the scripts share: the real weights, error measures, sizes, output folders, plots.

Every script writes under ``results/tmp/<name>`` (git-ignored) unless ``--out`` names a
folder: the committed results in ``results/`` change only when asked for.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

SCRATCH = Path("results/tmp")


def default_out(name: str) -> str:
    """Where a script writes when ``--out`` is not given (never a committed result)."""
    return str(SCRATCH / name)


def smollm2_state() -> dict[str, torch.Tensor]:
    """The real SmolLM2-135M weights (fp32 state dict of the offline checkpoint)."""
    from safetensors.torch import load_file

    from vc_quant.testing import smollm2_checkpoint

    return load_file(str(smollm2_checkpoint() / "model.safetensors"))


def rel_mse(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative squared error ``||approx - ref||² / ||ref||²`` (float64 sums)."""
    return float(((approx.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum())


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors shards of a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers inside the decoder blocks (what vc_quant, RTN and HQQ quantize)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot_curves(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, path: Path) -> None:
    """Line plot of ``{label: (xs, ys)}`` saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "-o" if len(xs) < 30 else "-", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def finish_log_plot(fig, ax, ylabel: str, path: Path, title: str | None = None) -> None:
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per weight")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
