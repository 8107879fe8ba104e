"""Apps and helpers for the task-framework tests (tests/test_contrib_*.py): each app module is imported by a
real worker process (``celery -A``, ``dramatiq``, ``taskiq worker``) and configured through its environment."""
