"""python src/summary.py --help: runs mmctr.summary (src/mmctr/summary.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.summary")  # imported inside: a Ctrl-C while torch loads is one line too
