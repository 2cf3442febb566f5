"""Lab 04, prefill/decode disaggregation: processes for the ranks (``launch``) and the channel that carries
KV blocks between them (``link``)."""
from servelab.disagg.launch import RankContext, RankResult, run_ranks
from servelab.disagg.link import (
    HEADER_FIELDS, KIND_DONE, KIND_ERROR, KIND_KV, Handle, Link, PeerLost, TransferTimeout,
)

__all__ = [
    "HEADER_FIELDS", "KIND_DONE", "KIND_ERROR", "KIND_KV", "Handle", "Link", "PeerLost", "RankContext",
    "RankResult", "TransferTimeout", "run_ranks",
]
