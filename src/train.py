"""python src/train.py --help: runs mmctr.train (src/mmctr/train.py)."""
from mmctr.train import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
