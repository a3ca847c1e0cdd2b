"""python src/blend.py --help: runs mmctr.blend (src/mmctr/blend.py)."""
from mmctr.common import interrupt_ends_in_one_line, run_main

if __name__ == "__main__":
    with interrupt_ends_in_one_line():  # a Ctrl-C while torch loads: one line, as while the stage runs
        from mmctr.blend import main
    run_main(main)
