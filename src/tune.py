"""python src/tune.py --help: runs mmctr.tune (src/mmctr/tune.py)."""
from mmctr.tune import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
