"""The KTO loss (Ethayarajh et al. 2024, eq. 7-8), as TRL's KTOTrainer computes it with
``loss_type="kto"``. Pure tensor math: no model, no data.

For a microbatch of m examples:

* r_i  = log πθ(y_i|x_i) − log πref(y_i|x_i)  (sums over completion tokens);
* z0   = max(0, mean over processes of mean_i[log πθ(y_j|x_i) − log πref(y_j|x_i)]), j ≠ i,
  detached (no gradient reaches it); ``use_reference_point=False`` gives the paper's z0 = 0
  ablation;
* desirable:   λD · (1 − σ(β (r_i − z0)));   undesirable: λU · (1 − σ(β (z0 − r_i)));
* loss = sum / m (the count, not the weights).

Every process calls the same collective (the z0 all-reduce) whatever the class mix of its
microbatch, so one-class microbatches neither produce NaN nor hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes when torch.distributed is initialised (identity otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            t = t.detach().clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            return t / world
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            t = t.detach().clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


@dataclass
class KTOOutput:
    loss: torch.Tensor  # scalar, differentiable
    losses: torch.Tensor  # [m] weighted per-example losses
    z0: torch.Tensor  # scalar, detached (after cross-process mean and clamp)
    kl_local: torch.Tensor  # scalar, this process's mean KL log-ratio, before the all-reduce
    rewards: torch.Tensor  # [m] β·r_i, detached
    # Sums and counts for cross-process / cross-microbatch aggregation of the logged metrics:
    # [sum_rewards_chosen, sum_rewards_rejected, sum_logps_chosen, sum_logps_rejected, n_chosen, n_rejected]
    stat_sums: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    use_reference_point: bool = True,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = all_reduce_mean,
) -> KTOOutput:
    """KTO loss for one microbatch; see the module docstring for the formula.

    ``policy_kl_logps``/``ref_kl_logps``: log π(y_j|x_i) for the mismatched pairs (any number of
    them, usually m). ``reduce_mean`` averages a scalar across processes (default:
    torch.distributed all-reduce when initialised); it is always called, exactly once, when
    ``use_reference_point`` is true.
    """
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    logratios = policy_logps - ref_logps
    if use_reference_point:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("the KL reference point needs policy_kl_logps and ref_kl_logps")
        kl_local = (policy_kl_logps.detach() - ref_kl_logps.detach()).float().mean()
        z0 = reduce_mean(kl_local).clamp(min=0).detach()
    else:
        kl_local = torch.zeros((), device=policy_logps.device)
        z0 = torch.zeros((), device=policy_logps.device)
    z0 = z0.to(logratios.dtype)
    chosen = lambda_d * (1 - F.sigmoid(beta * (logratios - z0)))
    rejected = lambda_u * (1 - F.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, chosen, rejected)
    loss = losses.sum() / max(1, losses.numel())
    rewards = beta * logratios.detach()
    d = desirable.to(rewards.dtype)
    u = 1 - d
    plogps = policy_logps.detach()
    stat_sums = torch.stack([
        (rewards * d).sum(), (rewards * u).sum(), (plogps * d).sum(), (plogps * u).sum(), d.sum(), u.sum()
    ]).float()
    return KTOOutput(loss, losses, z0, kl_local.detach(), rewards, stat_sums)


def metrics_from_sums(stat_sums: torch.Tensor) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected from
    (already globally summed) ``stat_sums``; a metric with no example is NaN-free: it is left out."""
    rc, rr, lc, lr, nc, nr = (float(x) for x in stat_sums.tolist())
    out: dict[str, float] = {"n_chosen": nc, "n_rejected": nr}
    if nc > 0:
        out["rewards/chosen"] = rc / nc
        out["logps/chosen"] = lc / nc
    if nr > 0:
        out["rewards/rejected"] = rr / nr
        out["logps/rejected"] = lr / nr
    if nc > 0 and nr > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
