"""Cross-subject (leave-one-subject-out) study as a Ray job: aligned vs base image embeddings.

A thin entry point: ``brainalign study run --kind cross_subject`` on the study file (format
and options: docs/sweep.md; the job set-up: docs/cluster.md). Submit it to a running cluster::

    make cluster-up && source .cluster/env.sh
    ray job submit --working-dir . -- python jobs/cross_subject.py --study jobs/cross_subject_mini.toml

or run it directly (``python jobs/cross_subject.py --study ...``): it then starts or joins a
local Ray. Every ``brainalign study run`` option works (``--set KEY=VALUE``, ``--fresh``,
``--resume``, ``--quiet``); ``--dry-run`` prints the plan and checks the study without
training (``brainalign study check``). Exit codes: 0 done, 2 bad study or location (nothing
ran), 130 stopped by ``ray job stop`` or Ctrl-C (the study's runs are marked KILLED; the
same command resumes).
"""

from __future__ import annotations

import os
import sys

from brainalign.cli import main

if __name__ == "__main__":
    # Ray Data's progress bars would bury the report in the job log (the driver's DataContext,
    # which carries this default, travels with the datasets to the Train workers).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = sys.argv[1:]
    action = "check" if "--dry-run" in args else "run"
    sys.exit(main(["study", action, "--kind", "cross_subject", *(a for a in args if a != "--dry-run")]))
