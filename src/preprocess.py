"""python src/preprocess.py --help: runs mmctr.preprocess (src/mmctr/preprocess.py)."""
from mmctr.common import interrupt_ends_in_one_line, run_main

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while torch loads: one line, as while the stage runs
        from mmctr.preprocess import main
    run_main(main)
