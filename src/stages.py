"""python src/stages.py --help: runs mmctr.stages (src/mmctr/stages.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.stages")  # imported inside: a Ctrl-C while torch loads is one line too
