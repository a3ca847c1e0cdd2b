"""python src/stages.py --help: runs mmctr.stages (src/mmctr/stages.py)."""
from mmctr.stages import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
