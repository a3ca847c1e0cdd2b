"""python src/preprocess.py --help: runs mmctr.preprocess (src/mmctr/preprocess.py)."""
from mmctr.preprocess import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
