"""Dependencies point one way: stage two (cache readers, head, training, evaluation) never loads a detector."""

import subprocess
import sys

from .conftest import REPO


def test_stage_two_does_not_import_detectors():
    code = ("import sys, pipeline.train, pipeline.inference, pipeline.evaluate, pipeline.cache, pipeline.head, "
            "pipeline.head.cost, pipeline.sweep, pipeline.targets, pipeline.checkpoint, "
            "pipeline.visualize, pipeline.sam_baseline, pipeline.faster_eval, pipeline.plots, pipeline.subsets, "
            "pipeline.views, pipeline.distributed; "
            "bad = [m for m in sys.modules if m.startswith('pipeline.detectors')]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kernels_do_not_import_pipeline():
    code = ("import sys, kernels.ops, kernels.reference; "
            "bad = [m for m in sys.modules if m.startswith('pipeline')]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
