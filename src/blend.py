"""python src/blend.py --help: runs mmctr.blend (src/mmctr/blend.py)."""
from mmctr.common import run_main

if __name__ == "__main__":
    run_main("mmctr.blend")  # imported inside: a Ctrl-C while torch loads is one line too
