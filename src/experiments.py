"""python src/experiments.py --help: runs mmctr.experiments (src/mmctr/experiments.py)."""
from mmctr.experiments import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
