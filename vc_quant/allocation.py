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

Input-column scaling (``scaling="fisher"``, the default): the same Fisher pass also
gives each tensor's column marginals ``c_j = Σ_i F_ij``. With ``F_ij ≈ r_i c_j / S``, a
tensor whose columns are multiplied by ``b_j`` before the (rotated, white-error) codec
and divided after has expected loss ∝ ``(Σ_ij b_j² W_ij²)(Σ_j c_j / b_j²)``, minimised by
``b_j ∝ (c_j / v_j)^(1/4)`` (``v_j`` the column's energy; Cauchy–Schwarz): reverse
water-filling across the input channels, calibration-free, 16 bits of side
information per column. The allocation then uses each tensor's scaled weighted energy.
Measured on SmolLM2-135M (AV1, 16 windows): perplexity 75.5 → 36.1 at 2.5 bpw, 22.9 →
20.2 at 3.5, 20.5 → 19.0 at 4.0; per-row scaling from the row marginals made it worse
(docs/results.md, "What moved the needle").

Optional calibration mode (``VcQuantizationConfig(calibration="file.txt")``): the
same estimate on windows of real text (:func:`calibration_sequences`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from vc_quant.codec.options import BITS_RANGE, check_bits
from vc_quant.errors import VcConfigError

logger = logging.getLogger(__name__)


def allocate_bits(
    numels: list[int], energies: list[float], sensitivities: list[float], budget: float,
    r_min: float = BITS_RANGE[0], r_max: float = BITS_RANGE[1],
) -> list[float]:  # fmt: skip
    """Equal-slope bits per tensor with average (weighted by ``numels``) equal to ``budget``.

    ``energies``: mean squared weight σ_i²; ``sensitivities``: s_i (> 0).
    """
    if not numels:
        return []
    if not r_min <= budget <= r_max:
        raise VcConfigError(f"allocation: budget {budget} outside [{r_min}, {r_max}]")
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


class _Progress(LogitsProcessor):
    """Advances a progress bar once per generated token (scores pass through unchanged)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.bar.update(1)
        return scores


@torch.no_grad()
def _sample_sequences(model, n_seqs: int, seqlen: int, seed: int) -> torch.Tensor:
    device = next(model.parameters()).device
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    with torch.random.fork_rng(devices=[]), tqdm(total=seqlen - 1, desc="vc_quant: sampling text for the "
                                                 "bit allocation", unit="token") as bar:  # fmt: skip
        torch.manual_seed(seed)
        start = torch.full((n_seqs, 1), int(bos), device=device)
        # all tokens sampled (top_k=0, top_p=1): exact Fisher samples; the attention mask is all ones
        # (no padding), which also silences generate's padding warning
        return model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=int(bos),
            logits_processor=LogitsProcessorList([_Progress(bar)]),
        )  # fmt: skip


@dataclass
class FisherStats:
    """The diagonal Fisher information of one weight: its mean and its column marginals."""

    mean: float
    columns: torch.Tensor  # float64 (in,): Σ over rows of the diagonal Fisher, per input column


def fisher_sensitivity(
    model, param_names: list[str], n_seqs: int = 8, seqlen: int = 128, seed: int = 0,
    sequences: torch.Tensor | None = None,
) -> dict[str, FisherStats]:  # fmt: skip
    """Diagonal Fisher information per parameter (mean, column marginals), from model-generated sequences.

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


def _fisher(model, param_names, seqs: torch.Tensor, t0: float, was_training: bool) -> dict[str, FisherStats]:
    seqs = seqs.to(next(model.parameters()).device)
    params = {n: model.get_parameter(n) for n in param_names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    cols = {n: torch.zeros(params[n].shape[-1], dtype=torch.float64) for n in param_names}

    def accumulate(name: str):
        def hook(p: torch.Tensor) -> None:
            g2 = p.grad.double().pow(2)
            cols[name] += (g2.reshape(-1, g2.shape[-1]).sum(0) if g2.dim() else g2.reshape(1)).cpu()
            p.grad = None  # each gradient is freed as soon as it is counted: no model-sized buffer

        return hook

    handles = [p.register_post_accumulate_grad_hook(accumulate(n)) for n, p in params.items()]
    try:
        for seq in tqdm(seqs, desc="vc_quant: Fisher sensitivity", unit="seq"):
            # log-likelihood of one sampled sequence: its gradient is one Fisher sample
            loss = model(seq[None], labels=seq[None]).loss * (seq.numel() - 1)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    out = {n: FisherStats(float(cols[n].sum()) / len(seqs) / params[n].numel(), cols[n] / len(seqs))
           for n in param_names}  # fmt: skip
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
    except (OSError, UnicodeDecodeError) as exc:
        raise VcConfigError(f"calibration={path!r}: cannot read the text file ({exc})") from exc
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    try:
        return token_windows(tokenizer, text, seqlen, n_seqs, bos=tokenizer.bos_token_id is not None)
    except ValueError as exc:
        raise VcConfigError(f"calibration={path!r}: {exc}") from exc


@dataclass
class TensorPlan:
    """How to encode one weight: its bits and, with scaling, its input-column scales."""

    bits: float
    col_scale: torch.Tensor | None = None  # fp16 (in,)


COL_SCALE_CLAMP = 8.0  # scales stay within [1/8, 8] of their geometric mean (measured: 4 is worse at 3.5 bpw)


def column_scales(weight: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Input-column scales ``b`` for ``weight`` and the tensor's scaled weighted energy (module docstring).

    Returns fp16 scales (geometric mean 1, clamped) and ``G = mean(b² W²) · Σ_j c_j/b_j² / n``
    — with ``b = 1`` it is ``mean(W²) · mean(diag F)``, the unscaled allocation weight.
    """
    w2 = weight.detach().double().reshape(-1, weight.shape[-1]).pow(2)
    c = columns.double() + 1e-3 * columns.double().mean()  # a floor: unused channels get finite scales
    v = w2.sum(0).clamp_min(1e-300)
    b = (c / v) ** 0.25
    b = (b / b.log().mean().exp()).clamp(1 / COL_SCALE_CLAMP, COL_SCALE_CLAMP).half()
    bd = b.double()
    n = w2.numel()
    weighted = float((w2 * bd**2).sum() / n * (c / bd**2).sum() / n)
    return b, weighted


def plan_bits(
    model, param_names: list[str], budget: float, method: str, scaling: str = "none",
    r_max: float = BITS_RANGE[1], **kwargs,
) -> dict[str, TensorPlan]:  # fmt: skip
    """Bits (and column scales) per parameter for ``method`` in {"uniform", "fisher"}, ``scaling`` in
    {"none", "fisher"}. The Fisher pass runs when either needs it. ``r_max``: the highest rate the
    codec reaches (:func:`vc_quant.codec.max_rate`); no tensor is planned above it."""
    budget = check_bits(budget)
    if method not in ("uniform", "fisher"):
        raise VcConfigError(f"allocation={method!r}: expected 'uniform' or 'fisher'")
    if scaling not in ("none", "fisher"):
        raise VcConfigError(f"scaling={scaling!r}: expected 'none' or 'fisher'")
    if not param_names or (method == "uniform" and scaling == "none"):
        return {n: TensorPlan(budget) for n in param_names}
    stats = fisher_sensitivity(model, param_names, **kwargs)
    tensors = {n: model.get_parameter(n).detach() for n in param_names}
    scales, weights = {}, []
    for n in param_names:
        if scaling == "fisher" and tensors[n].dim() >= 2:
            scales[n], weighted = column_scales(tensors[n], stats[n].columns)
        else:
            weighted = float(tensors[n].double().pow(2).mean()) * stats[n].mean
        weights.append(weighted)
    if method == "uniform":
        rates = [budget] * len(param_names)
    else:
        rates = allocate_bits([tensors[n].numel() for n in param_names], weights, [1.0] * len(param_names), budget,
                              r_max=max(budget, r_max))  # fmt: skip
        logger.info("fisher allocation: %.2f..%.2f bits per tensor", min(rates), max(rates))
    return {n: TensorPlan(r, scales.get(n)) for n, r in zip(param_names, rates, strict=True)}
