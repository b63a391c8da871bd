"""``celery -A worker.celery_app worker|beat``: the app configured from the environment."""
from worker.app import create_app

app = create_app()
celery = app
