"""catalog-index library: stage logic, storage, model, index, publish, client, CLI.

Stage code here never imports Airflow; the DAGs in dags/ only schedule it.
"""
__version__ = "0.1.0"

import warnings as _warnings

# Catalog PNGs often carry palette transparency; Pillow warns on every convert() of one.
# We composite on white on purpose, so the warning is noise in every stage's output.
_warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
