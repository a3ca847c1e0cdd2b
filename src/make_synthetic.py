"""python src/make_synthetic.py --help: runs mmctr.make_synthetic (src/mmctr/make_synthetic.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.make_synthetic")  # imported inside: a Ctrl-C while torch loads is one line too
