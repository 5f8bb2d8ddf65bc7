"""Python clients for the Rerank gRPC service; the generated stubs live in ``rerank.v1``."""
