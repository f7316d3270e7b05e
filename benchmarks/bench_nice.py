"""Training-step throughput of NICE: fused fast path vs the straightforward conv -> avgpool.

Not a test. Prints samples/s of a full training step (forward + backward + AdamW step, batch
128, D=768) for ``fast=True`` and ``fast=False`` at 63 x 250 (THINGS-EEG2) and 17 x 100
(Gifford's preprocessed release), the ratio, and checks that both paths give the same outputs
(train mode with the same dropout seed, and eval mode) from the same state_dict.

The two paths are timed in alternation, step by step, so that load from other processes on a
shared machine hits both alike; the reported figure is the median step time.

``--experiments`` also times the further exact rewrites that were tried (see docs/encoders.md):
the first stage as the polyphase conv1d (the previous default), a contiguous (not channels-last) layout
after the fused conv, BN folded into the convolutions for eval-mode inference, and
``torch.compile`` of the training step.

Usage::

    .venv/bin/python benchmarks/bench_nice.py                  # the two required shapes
    .venv/bin/python benchmarks/bench_nice.py --experiments    # plus the variants
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from brainalign.encoders import create_encoder
from brainalign.encoders.nice import NICE

SHAPES = ((63, 250), (17, 100))


# ---------------------------------------------------------------------------------- variants
class PolyphaseNICE(NICE):
    """The fused kernel as a stride-1 conv1d over blocks (the phases as channels): no window copy."""

    def _fused_temporal(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused_temporal_polyphase(x)


class ContiguousNICE(NICE):
    """The fast path, but its output copied to the standard contiguous (B, F, C, P) layout."""

    def _fused_temporal(self, x: torch.Tensor) -> torch.Tensor:
        return super()._fused_temporal(x).contiguous()


def fold_batchnorm(m: NICE) -> NICE:
    """An eval-only copy of ``m`` with both BNs folded into the convolutions before them (exact).

    In eval mode BN is a per-filter affine map; the temporal conv (and so the fused kernel) and
    the spatial conv are linear, so the scale goes into their weights and the shift into their
    biases, and the BN passes over the large (B, 40, C, P) activations disappear.
    """
    folded = copy.deepcopy(m).eval()
    with torch.no_grad():
        for conv_i, bn_i in ((0, 2), (4, 5)):
            conv, bn = folded.tsconv[conv_i], folded.tsconv[bn_i]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale[:, None, None, None])
            conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
            folded.tsconv[bn_i] = torch.nn.Identity()
    return folded


# ---------------------------------------------------------------------------------- timing
def make_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    target = torch.randn(x.shape[0], 768)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()

    return step


def time_alternating(
    steps: dict[str, Callable[[], object]], n: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU seconds per call of each callable, called in turn ``n`` times.

    On a shared, loaded machine the wall time mostly measures the scheduler; the process CPU
    time (all threads) is the steadier measure of the work done, so both are reported.
    """
    for f in steps.values():
        for _ in range(warmup):
            f()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(n):
        for k, f in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}


def check_same_outputs(fast: NICE, slow: NICE, x: torch.Tensor) -> float:
    """Max abs difference of outputs, train mode (same dropout seed) and eval mode."""
    worst = 0.0
    for mode in (True, False):
        fast.train(mode)
        slow.train(mode)
        with torch.no_grad():
            torch.manual_seed(123)
            a = fast(x)
            torch.manual_seed(123)
            b = slow(x)
        worst = max(worst, float((a - b).abs().max()))
    fast.train()
    slow.train()
    return worst


def build_pair(n_chans: int, n_times: int) -> tuple[NICE, NICE]:
    torch.manual_seed(0)
    fast = create_encoder("nice", n_chans=n_chans, n_times=n_times, embed_dim=768, fast=True)
    slow = copy.deepcopy(fast)
    assert isinstance(fast, NICE) and isinstance(slow, NICE)
    slow.fast = False
    return fast, slow


def variant(cls: type[NICE], like: NICE, n_chans: int, n_times: int) -> NICE:
    m = cls(n_chans=n_chans, n_times=n_times, embed_dim=768)
    m.load_state_dict(like.state_dict())
    return m


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experiments", action="store_true", help="also time the further rewrites")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, D=768")
    for n_chans, n_times in SHAPES:
        torch.manual_seed(1)
        x = torch.randn(args.batch, n_chans, n_times)
        fast, slow = build_pair(n_chans, n_times)
        diff = check_same_outputs(fast, slow, x)
        assert diff < 1e-4, f"fast and straightforward NICE disagree by {diff}"
        steps = {"straightforward": make_step(slow, x), "fast": make_step(fast, x)}
        if args.experiments:
            for name, cls in (("polyphase-conv1d", PolyphaseNICE), ("fast-contiguous", ContiguousNICE)):
                m = variant(cls, fast, n_chans, n_times)
                ref = copy.deepcopy(fast)  # same BN running statistics as the variant
                ref.fast = False
                assert check_same_outputs(m, ref, x) < 1e-4, name
                steps[name] = make_step(m, x)
            compiled = copy.deepcopy(fast)
            try:
                steps["fast+compile"] = make_step(torch.compile(compiled), x)  # type: ignore[arg-type]
                steps["fast+compile"]()  # compile now, not inside the timing
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                steps.pop("fast+compile", None)
        med = time_alternating(steps, args.steps, args.warmup)
        base, base_cpu = med["straightforward"]
        print(f"{n_chans} x {n_times}: outputs agree to {diff:.1e}; load average {os.getloadavg()[0]:.1f}")
        for name, (t, c) in med.items():
            print(
                f"  {name:16s} {args.batch / t:8.0f} samples/s  {t * 1e3:8.1f} ms/step  x{base / t:.2f}"
                f"   | cpu {c * 1e3:8.1f} ms/step  x{base_cpu / c:.2f}"
            )
        if args.experiments:  # eval-mode inference: plain fast path vs BN folded into the convs
            fast.eval()
            slow.eval()
            folded = fold_batchnorm(fast)
            with torch.no_grad():
                diff_fold = float((folded.features(x) - fast.features(x)).abs().max())
                inf = time_alternating(
                    {
                        "eval straight": lambda s=slow, x=x: s.features(x),
                        "eval fast": lambda f=fast, x=x: f.features(x),
                        "eval fast+BN-fold": lambda f=folded, x=x: f.features(x),
                    },
                    args.steps,
                    args.warmup,
                )
            fast.train()
            slow.train()
            print(f"  eval features, BN folded agrees to {diff_fold:.1e}:")
            for name, (t, c) in inf.items():
                print(f"    {name:18s} {args.batch / t:8.0f} samples/s  cpu {c * 1e3:7.1f} ms/batch")


if __name__ == "__main__":
    main()
