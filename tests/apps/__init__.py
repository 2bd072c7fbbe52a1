"""ASGI apps that the reliability tests run in-process and under a real uvicorn server."""
