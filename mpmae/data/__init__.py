"""MMEarth data: the folder reader, the synthetic generator, shards and loaders."""

from mpmae.data.mmearth import MMEarthDataset, MMEarthFiles, MMEarthFormatError

__all__ = ["MMEarthDataset", "MMEarthFiles", "MMEarthFormatError"]
