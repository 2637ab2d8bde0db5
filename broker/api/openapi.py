"""The API's name for ``broker.openapi``, where the document is built (below both ``api`` and ``web``)."""

from broker.openapi import ERRORS, Operation, build, documented_routes, operation

__all__ = ["ERRORS", "Operation", "build", "documented_routes", "operation"]
