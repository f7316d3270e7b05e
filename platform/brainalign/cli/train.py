"""``brainalign train CONFIG [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train one brain encoder (Ray Data -> Ray Train -> test -> MLflow)")
    p.add_argument("--config", type=Path, default=None, help="TOML config ([config] table or top level)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. lr=1e-3 data.subjects=01,02")
    p.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from ..config import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(args.overrides))
    if args.print_config:
        sys.stdout.write(json.dumps(cfg.resolved().to_flat(), indent=2, default=list) + "\n")
        return 0
    from ..train.runner import RunSpec, run_training

    res = run_training(cfg, RunSpec(evaluate_test=not args.no_test))
    lines = [f"MLflow run: {res.run_id}", f"best epoch (by {cfg.select_metric}): {res.best_epoch}"]
    lines += [f"val   {k}: {v:.4f}" for k, v in sorted(res.val.items())]
    if res.test:
        n = int(res.test.get("test_n_way", 0))
        lines.append(f"test top-1 ({n}-way): {res.test['test_top1']:.3f}   (chance {1 / max(n, 1):.4f})")
        lines.append(f"test top-5 ({n}-way): {res.test['test_top5']:.3f}   (chance {min(5, n) / max(n, 1):.4f})")
        for key, v in sorted(res.test.items()):  # large galleries (test.gallery = "test+train")
            m = re.fullmatch(r"test_top([15])_(\d+)way", key)
            if m and int(m.group(2)) != n:
                k, g = int(m.group(1)), int(m.group(2))
                lines.append(f"test top-{k} ({g}-way): {v:.3f}   (chance {k / g:.5f})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
