"""Pure loss functions for T-REG and its base objectives (DPO, SimPO).

Everything here is a function of tensors: no model, no config, no I/O. Inputs are per-token (``[B, T]``) so that the
reduction (sum over a response, or mean for SimPO's length normalisation) is decided once, here.

Notation (see METHOD.md): ``y_w`` chosen, ``y_l`` rejected, ``β`` beta, ``α`` alpha, ``r̂_t`` the self-generated token
reward in (-0.5, 0.5), ``σ`` the logistic function.

References:
    DPO   Rafailov et al. 2023, arXiv 2305.18290.
    SimPO Meng et al. 2024, arXiv 2405.14734.
    T-REG Zhou et al. 2024, arXiv 2412.02685.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BASE_LOSSES = ("dpo", "simpo")
DPO_VARIANTS = ("sigmoid", "hinge", "ipo", "apo_zero", "apo_down")


@dataclass
class TRegLossOutput:
    """Result of :func:`treg_loss`. Only ``losses`` carries gradient; every other field is detached.

    Shapes: ``[B]`` unless noted.
    """

    losses: torch.Tensor  # L_base + α·w·(L_REG(y_w) + L_REG(y_l)), with grad
    base_losses: torch.Tensor  # L_DPO or L_SimPO
    reg_losses: torch.Tensor  # w·(L_REG(y_w) + L_REG(y_l)), before α
    weights: torch.Tensor  # w, the detached sequence weight
    chosen_rewards: torch.Tensor  # implicit sequence reward r(x, y_w)
    rejected_rewards: torch.Tensor  # implicit sequence reward r(x, y_l)
    chosen_token_agreement: torch.Tensor  # fraction of chosen tokens where sign(r_θ(y_t)) == sign(r̂_t)
    rejected_token_agreement: torch.Tensor  # the same for rejected tokens


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t · logp_t. Shapes: ``[B, T]``, ``[B, T]`` → ``[B]``."""
    return (token_logps * mask).sum(dim=-1)


def implicit_token_rewards(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    base: str,
    beta: float,
) -> torch.Tensor:
    """The policy's implicit reward per token, zero on padding.

    DPO:   r_θ(y_t) = β · (logp_θ(y_t) − logp_ref(y_t))
    SimPO: r_θ(y_t) = (β / |y|) · logp_θ(y_t)          (METHOD.md §2, the SimPO-REG choice)

    Summing over t gives the implicit sequence reward of each objective. Shapes: ``[B, T]`` in and out.
    """
    mask = mask.to(policy_logps.dtype)
    if base == "dpo":
        if ref_logps is None:
            raise ValueError("base='dpo' needs reference log-probs; pass ref_*_logps or use base='simpo'.")
        return beta * (policy_logps - ref_logps) * mask
    if base == "simpo":
        lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        return beta * policy_logps * mask / lengths
    raise ValueError(f"Unknown base loss {base!r}; expected one of {BASE_LOSSES}.")


def dpo_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO and its common variants on implicit sequence rewards ``r = β·Σ_t (logp_θ − logp_ref)``. Shape ``[B]``.

    sigmoid: −(1−ε)·log σ(Δ) − ε·log σ(−Δ), Δ = r_w − r_l            (ε = label_smoothing, cDPO; ε=0 is DPO)
    hinge:   max(0, 1 − Δ)                                           (SLiC-style)
    ipo:     (Δ_avg/β − 1/(2β))², Δ_avg from per-token averaged log-ratios, as TRL normalises IPO
    apo_zero: (1 − σ(r_w)) + σ(r_l)          (APO, D'Oosterlinck et al. 2024, arXiv 2408.06266: chosen up, rejected
                                             down; for chosen answers better than the model's own)
    apo_down: σ(r_w) + (1 − σ(Δ))            (APO for chosen answers worse than the model's own)
    """
    delta = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    if loss_type == "hinge":
        return torch.relu(1 - delta)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths.")
        avg_delta = (chosen_rewards / chosen_lengths.clamp(min=1) - rejected_rewards / rejected_lengths.clamp(min=1))
        return (avg_delta / beta - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(delta))
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {DPO_VARIANTS}.")


def simpo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """SimPO: −log σ(r_w − r_l − γ) on length-normalised rewards ``r = (β/|y|)·Σ_t logp_θ``. Shape ``[B]``."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)


def sequence_weight(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, gamma: float = 0.0):
    """w = stopgrad σ(r_l − r_w + γ): the (SimPO-margin-shifted) DPO gradient coefficient. Shape ``[B]``."""
    return torch.sigmoid(rejected_rewards - chosen_rewards + gamma).detach()


def token_regularizer(token_rewards: torch.Tensor, implicit_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_REG(x, y) = −Σ_t r̂_t · r_θ(y_t), over completion tokens only. Shapes ``[B, T]`` → ``[B]``.

    Its gradient is −Σ_t r̂_t ∂r_θ(y_t): tokens the model itself rates as improving the answer (r̂ > 0) get their
    implicit reward pushed up, whatever side of the pair they sit on.
    """
    return -(token_rewards.to(implicit_rewards.dtype) * implicit_rewards * mask).sum(dim=-1)


def _sign_agreement(token_rewards: torch.Tensor, implicit_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    agree = ((token_rewards * implicit_rewards) > 0).to(implicit_rewards.dtype) * mask
    return agree.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def _base_loss_and_weight(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    base: str,
    beta: float,
    gamma: float,
    loss_type: str,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base objective L_DPO or L_SimPO and its sequence weight w = stopgrad σ(r_l − r_w + γ). Shapes ``[B]``."""
    if base == "dpo":
        base_losses = dpo_loss(
            chosen_rewards,
            rejected_rewards,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_mask.sum(dim=-1),
            rejected_lengths=rejected_mask.sum(dim=-1),
        )
        return base_losses, sequence_weight(chosen_rewards, rejected_rewards)
    base_losses = simpo_loss(chosen_rewards, rejected_rewards, gamma=gamma)
    return base_losses, sequence_weight(chosen_rewards, rejected_rewards, gamma=gamma)


def _regularizer_losses(
    weights, chosen_token_rewards, rejected_token_rewards, chosen_tok, rejected_tok, chosen_mask, rejected_mask
) -> torch.Tensor:
    """The weighted token-level term w·(L_REG(x, y_w) + L_REG(x, y_l)), before α. Shape ``[B]``."""
    if chosen_token_rewards is None or rejected_token_rewards is None:
        raise ValueError("alpha != 0 needs chosen_token_rewards and rejected_token_rewards.")
    return weights * (
        token_regularizer(chosen_token_rewards, chosen_tok, chosen_mask)
        + token_regularizer(rejected_token_rewards, rejected_tok, rejected_mask)
    )


def _token_agreements(
    chosen_token_rewards, rejected_token_rewards, chosen_tok, rejected_tok, chosen_mask, rejected_mask, like
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached per-side sign agreement of r̂_t and r_θ(y_t); NaN (shaped like ``like``) without token rewards."""
    if chosen_token_rewards is not None and rejected_token_rewards is not None:
        chosen_agree = _sign_agreement(chosen_token_rewards, chosen_tok.detach(), chosen_mask)
        rejected_agree = _sign_agreement(rejected_token_rewards, rejected_tok.detach(), rejected_mask)
        return chosen_agree, rejected_agree
    nan = torch.full_like(like, float("nan")).detach()
    return nan, nan


def treg_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_token_rewards: torch.Tensor | None,
    rejected_token_rewards: torch.Tensor | None,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    base: str = "dpo",
    beta: float = 0.1,
    alpha: float = 0.0,
    gamma: float = 0.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    use_sequence_weight: bool = True,
) -> TRegLossOutput:
    """T-REG: a sequence-level preference loss plus token-level reward regularization (METHOD.md §2).

        L = L_base + α · w · (L_REG(x, y_w) + L_REG(x, y_l))
        L_REG(x, y) = −Σ_t r̂_t · r_θ(y_t)
        w = stopgrad σ(r(x, y_l) − r(x, y_w) + γ)        (γ = 0 for DPO)

    with r_θ and r from :func:`implicit_token_rewards` (DPO: β·log π/π_ref; SimPO: β/|y|·log π). ``alpha=0`` is
    exactly the base loss. Per-token DPO-sigmoid gradient weights: β·w·(1 + α·r̂_t) chosen, −β·w·(1 − α·r̂_t) rejected.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B, T]`` per-token log-probs of the completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B, T]`` reference log-probs; may be ``None`` for ``base="simpo"``.
        chosen_token_rewards, rejected_token_rewards: ``[B, T]`` r̂ in (−0.5, 0.5); may be ``None`` when α = 0.
        chosen_mask, rejected_mask: ``[B, T]`` 1 on completion tokens, 0 on padding.
        base: "dpo" or "simpo". beta: β. alpha: α. gamma: SimPO's target margin γ (ignored by DPO).
        loss_type, label_smoothing: DPO variant ("sigmoid" with optional cDPO smoothing, "hinge", "ipo").
        use_sequence_weight: False replaces w by 1 (the paper's "no sequence weight" ablation).

    Returns:
        :class:`TRegLossOutput` with unreduced ``losses`` of shape ``[B]``; reduce with ``.mean()``.
    """
    if base not in BASE_LOSSES:
        raise ValueError(f"Unknown base loss {base!r}; expected one of {BASE_LOSSES}.")
    chosen_mask = chosen_mask.to(policy_chosen_logps.dtype)
    rejected_mask = rejected_mask.to(policy_rejected_logps.dtype)

    # [B, T] implicit token rewards r_θ(y_t); their row sums are the sequence rewards r(x, y)
    chosen_tok = implicit_token_rewards(policy_chosen_logps, ref_chosen_logps, chosen_mask, base=base, beta=beta)
    rejected_tok = implicit_token_rewards(
        policy_rejected_logps, ref_rejected_logps, rejected_mask, base=base, beta=beta
    )
    chosen_rewards, rejected_rewards = chosen_tok.sum(dim=-1), rejected_tok.sum(dim=-1)

    base_losses, weights = _base_loss_and_weight(
        chosen_rewards, rejected_rewards, chosen_mask, rejected_mask,
        base=base, beta=beta, gamma=gamma, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    if not use_sequence_weight:
        weights = torch.ones_like(weights)

    if alpha != 0.0:
        reg_losses = _regularizer_losses(
            weights, chosen_token_rewards, rejected_token_rewards, chosen_tok, rejected_tok, chosen_mask, rejected_mask
        )
        losses = base_losses + alpha * reg_losses
    else:
        reg_losses = torch.zeros_like(base_losses)
        losses = base_losses

    chosen_agree, rejected_agree = _token_agreements(
        chosen_token_rewards, rejected_token_rewards, chosen_tok, rejected_tok, chosen_mask, rejected_mask, base_losses
    )
    return TRegLossOutput(
        losses=losses,
        base_losses=base_losses.detach(),
        reg_losses=reg_losses.detach(),
        weights=weights,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_token_agreement=chosen_agree,
        rejected_token_agreement=rejected_agree,
    )
