"""Python clients for the Rerank gRPC service; the generated stubs live in ``rerank.v1``.

    from clients import RerankClient

    with RerankClient("localhost:50051") as client:
        ranked = client.rerank("what is a panda?", ["The giant panda is a bear.", "Paris is in France."])
        print(ranked.indices, [r.score for r in ranked.results])
"""

from clients.client import (
    AsyncRerankClient,
    ModelInfo,
    Query,
    RankedResult,
    RerankClient,
    RerankError,
    RerankResult,
    Usage,
)
from clients.pacing import Pacing

__all__ = ["AsyncRerankClient", "ModelInfo", "Pacing", "Query", "RankedResult", "RerankClient", "RerankError",
           "RerankResult", "Usage"]
