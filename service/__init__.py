"""The service: gRPC servicer, HTTP API, auth, billing and admission around the worker.

Nothing in this package imports torch: the model lives behind ``worker.types.Runner``, and
``rerank serve`` loads ``worker.runner`` lazily, at start-up.
"""
