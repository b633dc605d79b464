"""Benchmarks of KSI against plain Dramatiq and Celery: ``python -m bench``."""
