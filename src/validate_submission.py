"""python src/validate_submission.py --help: runs mmctr.validate_submission (src/mmctr/validate_submission.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.validate_submission")  # imported inside: a Ctrl-C while torch loads is one line too
