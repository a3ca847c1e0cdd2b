"""python src/score.py --help: runs mmctr.score (src/mmctr/score.py)."""
from mmctr.score import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
