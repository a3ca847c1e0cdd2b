"""python src/single.py --help: runs mmctr.single (src/mmctr/single.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.single")  # imported inside: a Ctrl-C while torch loads is one line too
