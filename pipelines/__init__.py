"""catalog-index library: stage logic, storage, model, index, publish, client, CLI.

Stage code here never imports Airflow; the DAGs in dags/ only schedule it.
"""
__version__ = "0.1.0"
