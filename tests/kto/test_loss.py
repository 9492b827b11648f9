import math

import pytest
import torch

from worker.kto.loss import kto_loss, metrics_from_sums


def _ref_f64(pol, ref, des, pkl, rkl, beta, ld, lu, use_z0=True):
    """Independent float64 re-derivation from the paper / TRL, in plain Python."""
    z0 = max(0.0, sum(a - b for a, b in zip(pkl, rkl)) / len(pkl)) if use_z0 else 0.0
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    total = 0.0
    for p, r, d in zip(pol, ref, des):
        lr = p - r
        total += ld * (1 - sig(beta * (lr - z0))) if d else lu * (1 - sig(beta * (z0 - lr)))
    return total / len(pol), z0


CASES = [
    # policy, ref, desirable, policy_kl, ref_kl, beta, λD, λU
    ([-5.0, -7.0, -3.5, -9.0], [-5.5, -6.0, -4.0, -8.0], [1, 0, 1, 0], [-6.0, -8.0, -4.0, -7.0],
     [-6.5, -8.2, -4.1, -7.3], 0.1, 1.0, 1.0),
    ([-5.0, -7.0, -3.5], [-5.5, -6.0, -4.0], [1, 1, 0], [-6.0, -8.0, -4.0], [-5.0, -7.0, -3.0], 0.5, 1.33, 1.0),
    ([-2.0, -30.0], [-12.0, -3.0], [0, 1], [-1.0, -2.0], [-20.0, -22.0], 2.0, 4.0, 0.7),  # large z0
]


@pytest.mark.parametrize("case", CASES)
def test_golden_against_float64(case):
    pol, ref, des, pkl, rkl, beta, ld, lu = case
    want, want_z0 = _ref_f64(pol, ref, des, pkl, rkl, beta, ld, lu)
    out = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(des, dtype=torch.bool), torch.tensor(pkl),
                   torch.tensor(rkl), beta=beta, lambda_d=ld, lambda_u=lu)
    assert out.loss.item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert out.z0.item() == pytest.approx(want_z0, rel=1e-6, abs=1e-7)
    # z0 = 0 ablation
    want0, _ = _ref_f64(pol, ref, des, pkl, rkl, beta, ld, lu, use_z0=False)
    out0 = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(des, dtype=torch.bool), beta=beta,
                    lambda_d=ld, lambda_u=lu, use_reference_point=False)
    assert out0.loss.item() == pytest.approx(want0, rel=1e-6)
    assert out0.z0.item() == 0.0


def test_fixed_numbers():
    # hand-computed: z0 = mean([0.5, 0.2]) = 0.35; r = [0.5, -1.0]; beta = 1
    out = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-1.5, -2.0]), torch.tensor([True, False]),
                   torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.2]), beta=1.0)
    d = 1 - 1 / (1 + math.exp(-(0.5 - 0.35)))
    u = 1 - 1 / (1 + math.exp(-(0.35 + 1.0)))
    assert out.loss.item() == pytest.approx((d + u) / 2, rel=1e-6)


def test_z0_is_clamped_at_zero():
    out = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([True, False]),
                   torch.tensor([-5.0, -5.0]), torch.tensor([-1.0, -1.0]))
    assert out.z0.item() == 0.0
    assert out.kl_local.item() == pytest.approx(-4.0)


def test_no_gradient_reaches_z0():
    pol = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    pkl = torch.tensor([-0.5, -0.7, -1.0], requires_grad=True)
    out = kto_loss(pol, torch.tensor([-1.5, -1.0, -3.2]), torch.tensor([True, False, True]), pkl,
                   torch.tensor([-1.0, -1.0, -1.0]), beta=0.3)
    assert not out.z0.requires_grad
    out.loss.backward()
    assert pkl.grad is None  # the KL log-probs never enter the graph
    assert pol.grad is not None and torch.all(pol.grad != 0)
    # gradient equals the analytic one with z0 as a constant
    z0 = out.z0.item()
    r = (pol.detach() - torch.tensor([-1.5, -1.0, -3.2])).double()
    s = torch.sigmoid(0.3 * (r - z0))
    su = torch.sigmoid(0.3 * (z0 - r))
    g = torch.where(torch.tensor([True, False, True]), -0.3 * s * (1 - s), 0.3 * su * (1 - su)) / 3
    assert torch.allclose(pol.grad.double(), g, atol=1e-7)


@pytest.mark.parametrize("label", [True, False])
def test_one_class_microbatch_no_nan(label):
    n = 3
    out = kto_loss(torch.randn(n), torch.randn(n), torch.full((n,), label), torch.randn(n), torch.randn(n))
    assert torch.isfinite(out.loss)
    m = metrics_from_sums(out.stat_sums)
    assert all(math.isfinite(v) for v in m.values())
    assert ("rewards/chosen" in m) == label and ("rewards/rejected" in m) == (not label)
    assert "rewards/margins" not in m


def test_single_example_microbatch():
    out = kto_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([True]), torch.tensor([-3.0]),
                   torch.tensor([-3.5]), beta=0.1)
    want, _ = _ref_f64([-1.0], [-2.0], [1], [-3.0], [-3.5], 0.1, 1, 1)
    assert out.loss.item() == pytest.approx(want, rel=1e-6)


def test_reduce_mean_called_before_clamp():
    calls = []

    def fake_reduce(t):  # pretend another process had mean KL of +3
        calls.append(t.item())
        return (t + 3.0) / 2

    out = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([True, False]),
                   torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0]), reduce_mean=fake_reduce)
    assert calls == [-1.0]
    assert out.z0.item() == pytest.approx(1.0)  # mean(-1, 3) = 1, then clamp: mean first, clamp second


def test_metrics_from_sums():
    out = kto_loss(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([-2.0, -2.5, -3.0]), torch.tensor([True, False, False]),
                   torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0]), beta=0.5)
    m = metrics_from_sums(out.stat_sums)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx((0.25 - 0.5) / 2)
    assert m["rewards/margins"] == pytest.approx(0.5 - (-0.125))
    assert m["logps/chosen"] == pytest.approx(-1.0)
    assert m["logps/rejected"] == pytest.approx(-3.0)
