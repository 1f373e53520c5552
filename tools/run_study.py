#!/usr/bin/env python
"""The CamVid 1/8 study: every method against the supervised baseline, several seeds, one report.

Run the study (each method x seed in its own process; runs whose final metrics exist are skipped):

    python tools/run_study.py                                   # 7 methods x seeds 0 1 -> output/camvid_study
    python tools/run_study.py --methods supervised_46 dgcl --seeds 0 --time-budget 540 --pack $OUT/part1.tar.gz
    python tools/run_study.py --only dgcl/1 ddfp                # just these runs (method or method/seed)

The CPU protocol (configs/camvid/protocol_cpu.yaml on top of every method's config; `make study-cpu`): runs train
under output/camvid_cpu, each finished run's metrics files are copied to docs/results/camvid_cpu/<method>/seed<k>/
(the committed results; runs found there are skipped) and the report is docs/results/camvid_cpu.md. Its schedule
is the file's base times its STUDY.SCHEDULE_SCALE (2: 2400 iterations); --schedule-scale replaces the factor:

    python tools/run_study.py --protocol cpu --methods supervised_46 mean_teacher --seeds 0

Only write the report from existing run folders (several roots, e.g. unpacked --pack archives):

    python tools/run_study.py --report --runs-root parts/1 parts/2   # -> docs/results/camvid.md + PNGs

Every run folder ``<root>/<method>/seed<k>/`` holds detectron2's ``metrics.json`` (losses, per-iteration ``time``,
every evaluation), ``config.yaml``, ``log.txt``, ``study_run.json`` (status, command, wall time, peak GPU
memory, device, torch threads) and ``predictions/<frame>.png`` (label maps of the reported network on the figure's val
frames); ``<root>/frames/`` holds those frames and their ground truth. The report reads only these files: the
table's numbers are the final evaluation rows of each run's ``metrics.json``. A run that is missing, unfinished
or unreadable is named in the report and left out of the means (exit status 3).

Several runs at once (``--parallel N``) share the cores: without ``OMP_NUM_THREADS`` each run gets cores // N
threads (torch's default of one per core in every run slows them all down many-fold); a set value is kept, with a
warning when it oversubscribes the cores.

Runs train exactly as ``tools/train_net.py --config-file <method config> SEED <k> OUTPUT_DIR <run dir> ...``
(the report lists that command per run). Extra ``KEY VALUE`` pairs at the end apply to every run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the study package

from study import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
