"""Parse a results-log variant name (`naked.fpn.lr10.scale8`) into a typed Variant.

Model tokens choose the architecture; training tokens (lrN, scaleN, sizeS, bsN, cs)
override the study's training values for that variant. See reference/variants.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from segdist.errors import SegdistError

DECODERS = ("naked", "aspp")
# Tokens that carry no meaning for the model (the log's family prefixes).
NEUTRAL_TOKENS = ("deeplabv2", "resnet101", "voc", "py", "newcode")
_NUMBERED = {
    "lr": "head_lr_mult",
    "scale": "epoch_scale",
    "size": "crop_size",
    "imagesize": "crop_size",
    "bs": "batch_size",
}
_NUMBERED_RE = re.compile(r"^(lr|scale|imagesize|size|bs)(\d+)$")


@dataclass(frozen=True)
class Variant:
    """What a variant name says. None means: the study's own value."""

    name: str
    decoder: str = "naked"
    dataset: str | None = None
    head_lr_mult: float | None = None
    epoch_scale: float | None = None
    crop_size: int | None = None
    batch_size: int | None = None


def valid_tokens() -> list[str]:
    return [*DECODERS, *NEUTRAL_TOKENS, "cs", "lrN", "scaleN", "sizeS", "imagesizeS", "bsN"]


def parse_variant(name: str) -> Variant:
    """Parse once; raise SegdistError naming the bad token and the valid ones."""
    fields: dict[str, object] = {}
    decoders = []
    for token in name.lower().split("."):
        number = _NUMBERED_RE.match(token)
        if number:
            key = _NUMBERED[number.group(1)]
            value = int(number.group(2))
            fields[key] = float(value) if key in ("head_lr_mult", "epoch_scale") else value
        elif token in DECODERS:
            decoders.append(token)
        elif token == "cs":
            fields["dataset"] = "cityscapes"
        elif token in NEUTRAL_TOKENS:
            continue
        else:
            raise SegdistError(
                f"unknown token {token!r} in variant {name!r}; valid tokens: "
                + ", ".join(valid_tokens())
            )
    if len(decoders) > 1:
        raise SegdistError(f"variant {name!r} names more than one decoder: {', '.join(decoders)}")
    return Variant(name=name, decoder=decoders[0] if decoders else "naked", **fields)
