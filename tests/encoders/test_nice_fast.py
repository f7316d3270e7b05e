"""NICE's fast path (temporal conv + average pool fused into one strided conv) is exact.

Same parameters, same state_dict, and outputs and gradients (w.r.t. the input and every
parameter) equal to the straightforward ``Conv2d -> AvgPool2d`` path to float tolerance, in train
mode (same dropout seed) and eval mode.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from brainalign.encoders import create_encoder
from brainalign.encoders.nice import NICE

TOL = dict(rtol=1e-4, atol=1e-5)


def _pair(n_chans: int, n_times: int, **arch: Any) -> tuple[NICE, NICE]:
    torch.manual_seed(0)
    fast = create_encoder("nice", n_chans=n_chans, n_times=n_times, embed_dim=16, fast=True, **arch)
    torch.manual_seed(0)
    slow = create_encoder("nice", n_chans=n_chans, n_times=n_times, embed_dim=16, fast=False, **arch)
    assert isinstance(fast, NICE) and isinstance(slow, NICE)
    return fast, slow


@pytest.mark.parametrize(
    ("n_chans", "n_times", "arch"),
    [
        (63, 250, {}),  # THINGS-EEG2: 36 patches
        (17, 100, {}),  # Gifford's 17 x 100: 6 patches
        (5, 77, {}),  # length not on the stride grid
        (4, 75, {}),  # exactly one patch
        (3, 40, dict(kernel_time=7, pool_time=4, pool_stride=3, n_filters=6)),  # 10-tap kernel, stride 3
        (3, 30, dict(kernel_time=5, pool_time=1, pool_stride=1, n_filters=4)),  # no pooling at all
    ],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_path_matches_straightforward(
    n_chans: int, n_times: int, arch: dict[str, Any], train: bool
) -> None:
    fast, slow = _pair(n_chans, n_times, **arch)
    sd_fast, sd_slow = fast.state_dict(), slow.state_dict()
    assert sd_fast.keys() == sd_slow.keys()
    assert all(torch.equal(sd_fast[k], sd_slow[k]) for k in sd_fast)
    fast.train(train)
    slow.train(train)
    x = torch.randn(3, n_chans, n_times)
    xf, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)
    out_fast = fast(xf)
    torch.manual_seed(7)
    out_slow = slow(xs)
    torch.testing.assert_close(out_fast, out_slow, **TOL)
    target = torch.randn_like(out_fast)
    (out_fast * target).sum().backward()
    (out_slow * target).sum().backward()
    torch.testing.assert_close(xf.grad, xs.grad, **TOL)
    slow_params = dict(slow.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in slow.parameters() if p.grad is not None)
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        if train and name in {"tsconv.0.bias", "tsconv.4.bias"}:
            # Biases right before a train-mode BN: their gradient is exactly zero in theory (BN
            # removes constant offsets), so both paths return float round-off of a large
            # cancelling sum; check that both are round-off rather than compare the noise.
            assert float(p.grad.abs().max()) < 1e-4 * scale, name
            assert float(slow_params[name].grad.abs().max()) < 1e-4 * scale, name
            continue
        torch.testing.assert_close(p.grad, slow_params[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    if train:  # BN running statistics update identically too
        for name, buf in fast.named_buffers():
            torch.testing.assert_close(buf, dict(slow.named_buffers())[name], **TOL, msg=name)


def test_fused_kernel_is_conv_kernel_convolved_with_box() -> None:
    fast, _ = _pair(4, 100)
    w = fast.tsconv[0].weight[:, 0, 0]  # (40, 25)
    k = fast.fused_kernel()
    assert k.shape == (40, 25 + 51 - 1)
    expected = torch.zeros_like(k)
    for j in range(51):  # k[m] = sum_{0 <= m - i < 51} w[i] / 51
        expected[:, j : j + 25] += w / 51
    torch.testing.assert_close(k, expected)
    # and the strided conv with it equals conv -> avgpool
    x = torch.randn(2, 1, 4, 100)
    ref = F.avg_pool2d(F.conv2d(x, fast.tsconv[0].weight, fast.tsconv[0].bias), (1, 51), (1, 5))
    fused = F.conv2d(x, k[:, None, None, :], fast.tsconv[0].bias, stride=(1, 5))
    torch.testing.assert_close(fused, ref, **TOL)


def test_state_dicts_load_across_paths() -> None:
    fast, slow = _pair(6, 100)
    torch.manual_seed(3)
    other = create_encoder("nice", n_chans=6, n_times=100, embed_dim=16, fast=False)
    fast.load_state_dict(other.state_dict())
    x = torch.randn(2, 6, 100)
    torch.testing.assert_close(fast.eval()(x), other.eval()(x), **TOL)
    assert not copy.deepcopy(slow).fast and fast.fast


def test_atms_head_fast_matches_straightforward() -> None:
    kw = dict(n_chans=5, n_times=60, embed_dim=16, n_subjects=2, d_model=80, n_heads=2, d_ff=16)
    torch.manual_seed(0)
    fast = create_encoder("atms", fast=True, **kw).eval()
    torch.manual_seed(0)
    slow = create_encoder("atms", fast=False, **kw).eval()
    x, s = torch.randn(3, 5, 60), torch.tensor([0, 1, -1])
    torch.testing.assert_close(fast(x, s), slow(x, s), **TOL)
