"""Data: MMEarth folders, the synthetic generator, shards and loaders, GEO-Bench tasks."""

from mpmae.data.geobench import GeoBenchDataset, GeoBenchFormatError
from mpmae.data.mmearth import MMEarthDataset, MMEarthFiles, MMEarthFormatError

__all__ = ["GeoBenchDataset", "GeoBenchFormatError", "MMEarthDataset", "MMEarthFiles", "MMEarthFormatError"]
