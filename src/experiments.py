"""python src/experiments.py --help: runs mmctr.experiments (src/mmctr/experiments.py)."""
from mmctr.common import interrupt_ends_in_one_line, run_main

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while torch loads: one line, as while the stage runs
        from mmctr.experiments import main
    run_main(main)
