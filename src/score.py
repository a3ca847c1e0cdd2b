"""python src/score.py --help: runs mmctr.score (src/mmctr/score.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.score")  # imported inside: a Ctrl-C while torch loads is one line too
