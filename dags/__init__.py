"""Example pipelines for the provider; installed as ``airflow_provider_cxpg.example_dags``."""
