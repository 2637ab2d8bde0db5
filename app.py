"""The WSGI entry point: ``gunicorn app:app`` and ``flask --app app``."""

from broker import create_app

app = create_app()
