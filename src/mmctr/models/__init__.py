"""The torch-only kit: layers, the model files, fit (the training loop), metrics, tables.

Its modules import one another relatively and nothing but torch and numpy, so the folder copied
beside a notebook (as models/) trains a fold alone: from models.qin import QIN (notebooks/one_fold.py)."""
