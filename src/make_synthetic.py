"""python src/make_synthetic.py --help: runs mmctr.make_synthetic (src/mmctr/make_synthetic.py)."""
from mmctr.make_synthetic import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
