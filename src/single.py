"""python src/single.py --help: runs mmctr.single (src/mmctr/single.py)."""
from mmctr.single import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
