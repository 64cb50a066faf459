"""Coupling flows: log-determinants against autograd's brute-force Jacobian, invertibility, clamping."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from anomalens.components.flows import CouplingFlow, gaussian_log_likelihood, soft_clamp


def conv_subnet(c_in: int, c_out: int, i: int) -> nn.Module:
    k = 3 if i % 2 == 0 else 1
    return nn.Sequential(nn.Conv2d(c_in, 8, k, padding=k // 2), nn.ReLU(), nn.Conv2d(8, c_out, k, padding=k // 2))


def fc_subnet(c_in: int, c_out: int, i: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def randomised(flow: CouplingFlow, scale: float = 0.5) -> CouplingFlow:
    """The last subnet layers start at zero (identity flow); randomise them so the check is not trivial."""
    torch.manual_seed(0)
    for block in flow.blocks:
        last = [m for m in block.subnet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        nn.init.normal_(last.weight, std=scale)
        nn.init.normal_(last.bias, std=scale)
    return flow.double()


def test_conv_flow_log_det_matches_the_brute_force_jacobian():
    # 3x3 subnets couple neighbouring positions: only the total log-det is exact, so compare that.
    flow = randomised(CouplingFlow(5, n_blocks=4, subnet=conv_subnet, clamp=2.0, seed=1))
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64)
    z, log_det = flow(x)
    assert z.shape == x.shape and log_det.shape == (1, 3, 4)
    jac = jacobian(lambda v: flow(v.view_as(x))[0].flatten(), x.flatten())
    sign, brute = torch.linalg.slogdet(jac)
    assert sign > 0  # an affine coupling with exp scales preserves orientation up to the permutation's sign
    assert abs(float(log_det.detach().sum()) - float(brute)) < 1e-9 * max(1.0, abs(float(brute)))
    assert abs(float(brute)) > 0.1  # the randomised flow really scales


@pytest.mark.parametrize("clamp_kind", ["atan", "tanh"])
def test_conditional_fc_flow_log_det_per_vector_matches_the_jacobian(clamp_kind):
    flow = randomised(CouplingFlow(6, n_blocks=5, subnet=fc_subnet, clamp=1.9, clamp_kind=clamp_kind,
                                   cond_channels=3, seed=2), scale=1.0)
    x, cond = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    z, log_det = flow(x, cond)
    assert log_det.shape == (4,)
    for i in range(4):  # each vector's Jacobian is its own 6x6 block
        jac = jacobian(lambda v, i=i: flow(v.unsqueeze(0), cond[i:i + 1])[0].squeeze(0), x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_flows_are_invertible():
    conv = randomised(CouplingFlow(7, n_blocks=8, subnet=conv_subnet, clamp=2.0, seed=3))
    x = torch.randn(2, 7, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv.inverse(conv(x)[0]), x, rtol=1e-10, atol=1e-10)
    fc = randomised(CouplingFlow(4, n_blocks=8, subnet=fc_subnet, clamp=1.9, cond_channels=2, seed=4))
    v, cond = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(fc.inverse(fc(v, cond)[0], cond), v, rtol=1e-10, atol=1e-10)


def test_a_fresh_flow_is_the_identity_and_the_likelihood_is_standard_normal():
    flow = CouplingFlow(4, n_blocks=3, subnet=fc_subnet, seed=0)
    x = torch.randn(5, 4)
    z, log_det = flow(x)
    # The permutations reorder channels but an identity coupling leaves the multiset of values alone.
    torch.testing.assert_close(z.sort(dim=1).values, x.sort(dim=1).values)
    assert torch.all(log_det == 0)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(gaussian_log_likelihood(z, log_det), expected)


def test_soft_clamp_bounds_and_slope():
    s = torch.tensor([-1e6, -1.0, 0.0, 1e-4, 1e6])
    for kind, slope in (("atan", 2 / math.pi), ("tanh", 1.0)):
        out = soft_clamp(s, 1.9, kind)
        assert out.abs().max() <= 1.9 and out[0] < -1.89 and out[-1] > 1.89
        assert math.isclose(float(out[3]), slope * 1e-4, rel_tol=1e-6)  # the slope at 0
    with pytest.raises(ValueError, match="unknown clamp kind"):
        soft_clamp(s, 1.0, "relu")
