"""The JSON the service answers, as pydantic models (they make the OpenAPI schema).

Distances, scores and thresholds are L2 distances (not squared) in the backbone's
embedding space, as everywhere in patchsearch; pixel coordinates are frame pixels.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every error answer: a stable code and a message naming the problem."""
    error: str = Field(description="machine-readable code, e.g. not_an_image, body_too_large, unknown_category")
    message: str


class Neighbour(BaseModel):
    """The training patch behind a memory-bank row."""
    bank_row: int
    image: Union[str, int, None] = Field(None, description="training image, relative to the category's data folder")
    tile: Optional[int] = None
    row: Optional[int] = Field(None, description="patch row on the tile's patch grid")
    col: Optional[int] = None


class Region(BaseModel):
    """A defect region: 8-connected pixels at or above the pixel threshold."""
    bbox: list[int] = Field(description="[x0, y0, x1, y1] frame pixels, x1/y1 exclusive")
    area: int = Field(description="frame pixels")
    peak: float
    peak_xy: list[int]
    mean: float


class Patch(BaseModel):
    tile: int
    row: int
    col: int


class Inspection(BaseModel):
    """The verdict on one frame (the same record ``patchsearch query`` prints)."""
    category: str
    version: Optional[str] = Field(description="index version that judged the frame, e.g. v000003")
    name: Optional[str] = Field(None, description="the uploaded file's name, if given")
    frame: dict = Field(description="{'width', 'height'} of the frame, pixels")
    decision: Literal["OK", "NG", "ERROR"] = Field(description="OK, NG, or ERROR (never OK for a frame that could not "
                                                   "be judged; ERROR, with a reason, when the index is not calibrated)")
    reason: Optional[str] = Field(None, description="why the decision is ERROR: uncalibrated, non_finite_score, ...")
    image_score: Optional[float] = Field(None, description="PatchCore Eq. 7 image score, L2")
    normalized_score: Optional[float] = Field(None, description="image_score / threshold (1.0 at the threshold)")
    threshold: Optional[float] = Field(description="calibrated image threshold (L2), null if uncalibrated")
    pixel_threshold: Optional[float] = None
    top_patch: Optional[Patch] = Field(None, description="the patch with the largest nearest-neighbour distance")
    distances: Optional[list[float]] = Field(None, description="its k=9 nearest memory-bank L2 distances, ascending")
    locations: Optional[list[int]] = Field(None, description="their memory-bank rows")
    neighbours: Optional[list[Neighbour]] = None
    regions: Optional[list[Region]] = None
    error: Optional[str] = None
    heatmap_png: Optional[str] = Field(None, description="with ?heatmap=png: base64 PNG of the heatmap over the frame")


class Category(BaseModel):
    """One category of the index directory: the version answering, and whether it is ready."""
    name: str
    ready: bool = Field(description="answers with the version CURRENT names, and that version is calibrated")
    reason: Optional[str] = Field(None, description="why not ready: load_failed, uncalibrated, unreadable_current, "
                                  "loading")
    message: Optional[str] = None
    pending_version: Optional[str] = Field(None, description="the version CURRENT names, when it is not answering")
    version: Optional[str] = Field(None, description="the version answering (null: none)")
    calibrated: bool = False
    backbone: Optional[str] = None
    layers: Optional[list[str]] = None
    embedding_dim: Optional[int] = None
    bank_size: Optional[int] = None
    index_type: Optional[str] = None
    geometry: Optional[dict] = None
    created: Optional[str] = Field(None, description="build time, ISO 8601 UTC")
    threshold: Optional[float] = Field(None, description="image threshold (L2), null if uncalibrated")
    pixel_threshold: Optional[float] = None
