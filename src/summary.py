"""python src/summary.py --help: runs mmctr.summary (src/mmctr/summary.py)."""
from mmctr.summary import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
