"""Orchestration: the daily job's steps wired together: plan, dispatch, wait and summarise an edition.

Celery tasks, the CLI, the demo and beat call it; the runtime turns settings into the objects below.
"""
