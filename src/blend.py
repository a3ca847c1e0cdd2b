"""python src/blend.py --help: runs mmctr.blend (src/mmctr/blend.py)."""
from mmctr.blend import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
