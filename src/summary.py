"""python src/summary.py --help: runs mmctr.summary (src/mmctr/summary.py)."""
from mmctr.common import interrupt_ends_in_one_line, run_main

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while torch loads: one line, as while the stage runs
        from mmctr.summary import main
    run_main(main)
