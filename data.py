"""Data and backbones shared by train.py and evaluate.py.

(Work in progress: dataset readers, chat formatting and backbone loading.)
"""

# ----------------------------------------------------------------------------- datasets


# ----------------------------------------------------------------------------- backbones
