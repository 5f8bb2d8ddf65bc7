"""The scoring engine: prompt building, the token-budget queue, the batcher, the model runner.

Importing this package (or ``worker.batcher``, ``worker.queue``, ``worker.prompt``,
``worker.types``, ``worker.fake``) does not import torch; ``worker.runner`` and
``worker.qwen3`` do. Nothing here imports grpc, HTTP or billing code.
"""
