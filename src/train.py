"""python src/train.py --help: runs mmctr.train (src/mmctr/train.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.train")  # imported inside: a Ctrl-C while torch loads is one line too
