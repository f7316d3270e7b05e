"""Pseudo-replication, measured: how often each paired test rejects a TRUE null.

Null draws of ``--subjects`` subjects x ``--seeds`` seeds. Each subject has its own level and
its own arm difference (drawn with mean 0: the arms do not differ on average) and each run a
small seed noise. Prints, per test, the share of draws with p < 0.05 and its binomial 95 % CI
(docs/statistics.md, "Subjects are the unit of inference").

Usage::

    python benchmarks/pseudoreplication.py            # 6 x 5, 400 draws, seed 0 (~1 min)
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats

from brainalign.stats import sign_flip_test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # MixedLM convergence chatter
    rng = np.random.default_rng(args.seed)
    n_sub, n_seed = args.subjects, args.seeds
    hits = dict.fromkeys(["runs: paired t", "LMM, random intercept", "LMM, random intercept + arm effect",
                          "subjects: paired t", "subjects: sign-flip"], 0)
    for _ in range(args.draws):
        level = rng.normal(0, 1, n_sub)  # subject's overall level
        effect = rng.normal(0, 1, n_sub)  # subject's own arm difference, mean 0: the null
        a = level[:, None] + effect[:, None] / 2 + rng.normal(0, 0.05, (n_sub, n_seed))
        b = level[:, None] - effect[:, None] / 2 + rng.normal(0, 0.05, (n_sub, n_seed))
        d = a.mean(1) - b.mean(1)
        df = pd.DataFrame({"subject": np.repeat(np.arange(n_sub), n_seed).tolist() * 2,
                           "arm": [1] * (n_sub * n_seed) + [0] * (n_sub * n_seed), "y": np.r_[a.ravel(), b.ravel()]})
        p = {
            "runs: paired t": stats.ttest_rel(a.ravel(), b.ravel()).pvalue,
            "LMM, random intercept": smf.mixedlm("y ~ arm", df, groups=df["subject"]).fit().pvalues["arm"],
            "LMM, random intercept + arm effect": smf.mixedlm("y ~ arm", df, groups=df["subject"],
                                                   re_formula="~arm").fit().pvalues["arm"],
            "subjects: paired t": stats.ttest_1samp(d, 0).pvalue,
            "subjects: sign-flip": sign_flip_test(d).p,
        }
        for k, v in p.items():
            hits[k] += bool(v < 0.05)
    print(f"{n_sub} subjects x {n_seed} seeds, {args.draws} null draws, seed {args.seed}")
    print("| test | rejection rate at p < 0.05 | 95 % CI (binomial) |\n|---|---|---|")
    for k, v in hits.items():
        ci = stats.binomtest(v, args.draws).proportion_ci()
        print(f"| {k} | {v / args.draws:.3f} | [{ci.low:.3f}, {ci.high:.3f}] |")


if __name__ == "__main__":
    main()
