"""Process-wide counts of what billing refused or failed at, read by ``service.metrics`` at scrape time.

The limiter, the ledger and the key store are built before (and apart from) the server's
``Metrics``, so they count here, as prometheus_client's default registry would, and
``Metrics`` exposes the counts. Labels are bounded by the code: a limit's name, never a key id
(a label per key would grow without bound).
"""

from __future__ import annotations

from collections import Counter

throttled: Counter[str] = Counter()  # calls refused by a per-key limit: "rps", "dps", "tpm", "quota"
ledger_errors: Counter[str] = Counter()  # database failures, by what the ledger was doing
