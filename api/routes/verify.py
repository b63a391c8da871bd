"""``POST /v1/verify``: upload any image; its Content Credentials and what the ledger knows of it."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from api.deps import ReaderDep, SessionDep
from api.errors import KEYED, WITH_BODY, APIError, error_responses
from api.schemas.verify import VerifyOut
from core.settings import get_settings
from core.verification import UnreadableImage, trust_anchors, verify

router = APIRouter(prefix="/verify", tags=["credentials"])


@router.post("", response_model=VerifyOut, responses=error_responses(*KEYED, *WITH_BODY),
             summary="Check an image: C2PA manifest (valid, signer, trusted), watermark, and its ledger record")
def verify_upload(file: Annotated[UploadFile, File(description="a PNG, WebP or JPEG image")],
                  session: SessionDep, principal: ReaderDep) -> VerifyOut:
    data = file.file.read()
    try:
        report = verify(data, anchors=trust_anchors(get_settings()), session=session,
                        can_see_team=principal.can_see_team)
    except UnreadableImage as exc:
        raise APIError(422, f"{file.filename or 'the upload'} is {exc}", code="unreadable_image") from None
    return VerifyOut.model_validate(report.as_dict())
