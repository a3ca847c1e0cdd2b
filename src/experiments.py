"""python src/experiments.py --help: runs mmctr.experiments (src/mmctr/experiments.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.experiments")  # imported inside: a Ctrl-C while torch loads is one line too
