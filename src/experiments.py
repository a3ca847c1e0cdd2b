"""python src/experiments.py --help: runs mmctr.experiments (src/mmctr/experiments.py)."""
from mmctr.interrupts import interrupt_ends_in_one_line

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while numpy or torch loads: one line, as while the stage runs
        from mmctr.common import run_main
        from mmctr.experiments import main
    run_main(main)
