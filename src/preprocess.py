"""python src/preprocess.py --help: runs mmctr.preprocess (src/mmctr/preprocess.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.preprocess")  # imported inside: a Ctrl-C while torch loads is one line too
