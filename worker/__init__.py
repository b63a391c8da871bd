"""The InstaBatch worker: Celery tasks that claim, generate, store, check and record images."""
