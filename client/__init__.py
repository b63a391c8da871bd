"""A small typed Python client of the InstaBatch API (httpx, parsed with the API's own schemas)::

    from client import InstaBatchClient

    with InstaBatchClient("https://instabatch.example.com", key="ib_...") as api:
        batch = api.submit_file("products.csv", fields={"priority": "high"})
        api.wait(batch.id, on_progress=lambda event: print(event.done_items, "/", event.total_items))
        api.download(batch.id, "out/", verdict=["pass"], decision=["approved"])
"""
from client.http import ApiError, DownloadInterrupted, DownloadSummary, InstaBatchClient, idempotency_key_for

__all__ = ["ApiError", "DownloadInterrupted", "DownloadSummary", "InstaBatchClient", "idempotency_key_for"]
