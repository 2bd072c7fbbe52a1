"""A Django project behind ContextMiddleware (see ``asgi.py``)."""
