"""Model-wide bit allocation: spend bits where the model's loss cares, under one budget.

Distortion model: at ``R`` bits the codec's error on tensor ``i`` is about
``n_i · σ_i² · c · 2^(-2R)`` (measured: c ≈ 1.6–2.3 on real weights, see the
codec benchmark). With a per-value sensitivity ``s_i`` (how much the loss grows
per unit of squared weight error) the allocation that minimises
``Σ s_i · n_i · σ_i² · 2^(-2R_i)`` subject to ``Σ n_i R_i = B`` is the equal-slope
(reverse water-filling) solution ``R_i = R̄ + ½·log2(s_i σ_i² / G)``, clamped to
``[r_min, r_max]``.

Sensitivity, calibration-free by default: the diagonal of the model's own Fisher
information, estimated on text *the model generates itself* (sequences sampled
from the model from BOS; their log-likelihood gradients are exact Fisher samples).
For a rotated codec the error is white inside a tensor, so the expected loss
increase is ``½ · mean(diag F_i) · ||ΔW_i||²``: ``s_i = mean(diag F_i)``.

Optional calibration mode (``VcQuantizationConfig(calibration="file.txt")``): the
same estimate on windows of real text (:func:`calibration_sequences`).
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


def allocate_bits(
    numels: list[int], energies: list[float], sensitivities: list[float], budget: float,
    r_min: float = 1.0, r_max: float = 6.0,
) -> list[float]:  # fmt: skip
    """Equal-slope bits per tensor with average (weighted by ``numels``) equal to ``budget``.

    ``energies``: mean squared weight σ_i²; ``sensitivities``: s_i (> 0).
    """
    if not numels:
        return []
    if not r_min <= budget <= r_max:
        raise ValueError(f"budget {budget} outside [{r_min}, {r_max}]")
    n = torch.tensor(numels, dtype=torch.float64)
    w = torch.tensor([max(e * s, 1e-300) for e, s in zip(energies, sensitivities, strict=True)], dtype=torch.float64)
    half_log = 0.5 * torch.log2(w)
    fixed = torch.zeros(len(numels), dtype=torch.bool)
    rates = torch.full_like(n, budget)
    for _ in range(len(numels) + 1):
        free = ~fixed
        if not bool(free.any()):
            break
        remaining = budget * n.sum() - (rates[fixed] * n[fixed]).sum()
        offset = (remaining - (half_log[free] * n[free]).sum()) / n[free].sum()
        rates[free] = half_log[free] + offset
        low, high = free & (rates < r_min), free & (rates > r_max)
        if not bool(low.any() or high.any()):
            break
        rates[low], rates[high] = r_min, r_max
        fixed |= low | high
    return rates.tolist()


@torch.no_grad()
def _sample_sequences(model, n_seqs: int, seqlen: int, seed: int) -> torch.Tensor:
    device = next(model.parameters()).device
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = torch.full((n_seqs, 1), int(bos), device=device)
        return model.generate(
            start, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen - 1,
            min_new_tokens=seqlen - 1, pad_token_id=int(bos),
        )  # fmt: skip


def fisher_sensitivity(
    model, param_names: list[str], n_seqs: int = 8, seqlen: int = 128, seed: int = 0,
    sequences: torch.Tensor | None = None,
) -> dict[str, float]:  # fmt: skip
    """Mean diagonal Fisher information per parameter, from model-generated sequences.

    ``sequences`` (token ids, ``(n, len)``): the optional calibration mode — gradients
    of the log-likelihood of real text instead (the *empirical* Fisher).
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    # half-precision matmuls are very slow on CPUs: run the pass in fp32 and cast back
    # (fp16/bf16 -> fp32 -> fp16/bf16 is exact, so the weights are unchanged)
    dtypes = {p: p.dtype for p in model.parameters()}
    upcast = next(model.parameters()).device.type == "cpu" and any(
        d in (torch.float16, torch.bfloat16) for d in dtypes.values()
    )
    if upcast:
        for p in dtypes:
            p.data = p.data.float()
    try:
        if sequences is None:
            sequences = _sample_sequences(model, n_seqs, seqlen, seed)
        return _fisher(model, param_names, sequences, t0, was_training)
    finally:
        if upcast:
            for p, d in dtypes.items():
                p.data = p.data.to(d)


def _fisher(model, param_names, seqs: torch.Tensor, t0: float, was_training: bool) -> dict[str, float]:
    seqs = seqs.to(next(model.parameters()).device)
    params = {n: model.get_parameter(n) for n in param_names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: 0.0 for n in param_names}
    try:
        for seq in seqs:
            model.zero_grad(set_to_none=True)
            # log-likelihood of one sampled sequence: its gradient is one Fisher sample
            loss = model(seq[None], labels=seq[None]).loss * (seq.numel() - 1)
            loss.backward()
            for n, p in params.items():
                acc[n] += float(p.grad.double().pow(2).sum())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    out = {n: acc[n] / len(seqs) / params[n].numel() for n in param_names}
    logger.info("Fisher sensitivity of %d tensors from %d sequences x %d tokens in %.1f s",
                len(param_names), seqs.shape[0], seqs.shape[1], time.perf_counter() - t0)  # fmt: skip
    return out


def calibration_sequences(model, path: str, n_seqs: int = 8, seqlen: int = 128) -> torch.Tensor:
    """``(n, seqlen)`` BOS-first token windows from the text file ``path`` (model's own tokenizer)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from vc_quant.evaluation import token_windows

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"calibration={path!r}: cannot read the text file ({exc})") from exc
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    try:
        return token_windows(tokenizer, text, seqlen, n_seqs, bos=tokenizer.bos_token_id is not None)
    except ValueError as exc:
        raise ValueError(f"calibration={path!r}: {exc}") from exc


def plan_bits(model, param_names: list[str], budget: float, method: str, **kwargs) -> dict[str, float]:
    """Bits per parameter for ``method`` in {"uniform", "fisher"}."""
    if method == "uniform" or not param_names:
        return dict.fromkeys(param_names, float(budget))
    if method != "fisher":
        raise ValueError(f"allocation={method!r}: expected 'uniform' or 'fisher'")
    sens = fisher_sensitivity(model, param_names, **kwargs)
    tensors = [model.get_parameter(n).detach() for n in param_names]
    energies = [float(t.double().pow(2).mean()) for t in tensors]
    rates = allocate_bits([t.numel() for t in tensors], energies, [sens[n] for n in param_names], budget)
    logger.info("fisher allocation: %.2f..%.2f bits per tensor", min(rates), max(rates))
    return dict(zip(param_names, rates, strict=True))
