"""Task frameworks on Replika: a kombu transport (Celery), a Dramatiq broker and a taskiq broker.

Each lives in its own module and imports its framework only there, so ``import replika`` (and this package)
pulls in none of them:

- :mod:`replika.contrib.kombu`: ``import replika.contrib.kombu`` registers the ``replika://`` and
  ``replikas://`` URL schemes with kombu, so a Celery app needs only ``broker_url = "replika://host:8777"``
  (``pip install 'replika[celery]'``).
- :mod:`replika.contrib.dramatiq`: ``ReplikaBroker`` (``pip install 'replika[dramatiq]'``).
- :mod:`replika.contrib.taskiq`: ``ReplikaBroker`` (``pip install 'replika[taskiq]'``).

All three hold a delivery as a Replika lease that a background task keeps alive with ``touch`` while the message
is held, turn delays into server-side delays, long-poll instead of sleeping, and dead-letter with Replika's own
``reject``.
"""

__all__: list[str] = []
