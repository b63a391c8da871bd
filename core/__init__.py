"""What the API and the worker share: settings, database sessions, object storage, audit chain."""
