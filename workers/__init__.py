"""The Celery side of prewarm: the app (``workers.app``) and its thin tasks (``workers.tasks``)."""
