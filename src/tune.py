"""python src/tune.py --help: runs mmctr.tune (src/mmctr/tune.py)."""
from mmctr.common import interrupt_ends_in_one_line, run_main

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while torch loads: one line, as while the stage runs
        from mmctr.tune import main
    run_main(main)
