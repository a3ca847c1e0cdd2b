"""python src/validate_submission.py --help: runs mmctr.validate_submission (src/mmctr/validate_submission.py)."""
from mmctr.validate_submission import main
from mmctr.common import run_main

if __name__ == "__main__":
    run_main(main)
