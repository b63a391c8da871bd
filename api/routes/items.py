"""One item with its images, QC results and reviews."""
from __future__ import annotations

from fastapi import APIRouter, Request

from api import queries
from api.deps import ReaderDep, SessionDep, visible_item
from api.errors import KEYED, error_responses
from api.schemas import ItemDetail

router = APIRouter(prefix="/items", tags=["items"])


@router.get("/{item_id}", response_model=ItemDetail, responses=error_responses(*KEYED, 404, meanings={404: "no such item (or another team's)"}),
            summary="One item: its images (time-limited URLs), QC results and review decisions")
def get_item(item_id: str, request: Request, session: SessionDep, principal: ReaderDep) -> ItemDetail:
    item, batch = visible_item(session, principal, item_id)
    return queries.item_detail(session, item, batch, str(request.base_url))
