"""The folder layouts, one module each: BIDS input discovery, CAPS, MAPS, the top of OUTPUT_DIR, splits.

Nothing outside these modules builds a path inside those folders.
"""
