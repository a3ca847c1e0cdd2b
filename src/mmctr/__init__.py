"""The solution as a package: the stages' modules (mmctr.train, mmctr.blend, ...) and the torch-only
model kit (mmctr.models). The scripts in src/ run them: python src/train.py ..."""
