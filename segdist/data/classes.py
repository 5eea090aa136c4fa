"""The one place for class lists, the ignore value and image statistics."""

from __future__ import annotations

IGNORE_INDEX = 255

# RGB mean/std in [0, 1] (torchvision's ImageNet statistics; see variants.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# The generated data set: textured objects with thin parts, written in the VOC layout.
SYNTHETIC_CLASSES = ("background", "disc", "bar", "ring", "cross", "frame")

DATASET_CLASSES = {
    "voc": VOC_CLASSES,
    "sbd": VOC_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
    "synthetic": SYNTHETIC_CLASSES,
}


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map as a flat [r, g, b, ...] list (PIL putpalette)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


# Cityscapes labelIds (gtFine/*_labelIds.png) -> train ids (0..18), everything else ignored.
# (name, id, trainId) as in the official cityscapesscripts.helpers.labels table; "license
# plate" (id -1) never appears in labelIds PNGs.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, -1),
)


def cityscapes_train_id_lut() -> list[int]:
    """256 entries: labelId -> trainId (0..18), IGNORE_INDEX for every other value."""
    lut = [IGNORE_INDEX] * 256
    for _name, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0 and 0 <= train_id < IGNORE_INDEX:
            lut[label_id] = train_id
    return lut


def cityscapes_label_id_lut() -> list[int]:
    """256 entries: trainId (0..18) -> labelId, for writing predictions in the official
    format; every other value (IGNORE_INDEX included) -> 0 ("unlabeled")."""
    lut = [0] * 256
    for _name, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0 and 0 <= train_id < IGNORE_INDEX:
            lut[train_id] = label_id
    return lut


# labelIds a Cityscapes labelIds PNG may hold (0..33); anything else is not a labelId.
CITYSCAPES_MAX_LABEL_ID = max(label_id for _name, label_id, _train in CITYSCAPES_LABELS)
