"""segdist: distributed, seed-repeated training of semantic-segmentation variants."""

__version__ = "0.1.0"
