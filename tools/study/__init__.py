"""The CamVid study of ``tools/run_study.py`` (its entry point and command line):

    configs.py  methods, protocols and the overrides that make one run's config
    runs.py     orchestration: plan, skip finished runs, launch children within the time budget, keep, pack
    child.py    one run in its own process (``run_study.py --child``)
    metrics.py  reading a run folder (metrics.json, study_run.json) and collecting the runs of a study
    report.py   the results doc's generated block and its figures
    cli.py      the command line
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
ENTRY = os.path.join(ROOT, "tools", "run_study.py")  # the command each child run is started with
sys.path.insert(0, ROOT)  # this checkout's semiseg_d2 first
