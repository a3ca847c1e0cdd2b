"""python src/tune.py --help: runs mmctr.tune (src/mmctr/tune.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.tune")  # imported inside: a Ctrl-C while torch loads is one line too
