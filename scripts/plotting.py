"""Shared finishing touches for the benchmark plots (log y axis, grid, legend, PNG)."""

from __future__ import annotations

from pathlib import Path


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
