"""Parse a results-log variant name into a typed, frozen Variant (reference/variants.md).

A name is dot-separated tokens, exactly as in the log:

    deeplabv2.naked.fpn.learnable.sobel.channelwise.1order
    deeplabv2.naked.edge.learnable.sobel.channelwise.lr10.newcode
    deeplabv2.cs.naked.fpn.lr10.scale8

The log's parenthesised form `deeplabv2.naked.fpn.standard(lr10,scale8)` is accepted too:
the comma-separated words in the brackets are more tokens. Case is ignored.

Some tokens are read together with the next one:
- `learnable.sobel` is the learnable masked-Sobel module (`learnable` alone is an error);
- `sobel.head` is the fixed Sobel after the stem; any other `sobel` is the fixed Sobel
  after res2 (`sobellast`: after res4; `sobel-res234`: after res2, res3 and res4);
- `fpn.standard` (also `fpnstandard`) and `fpn.bilinear` are decoders;
- `edge.conv3` is the edge input through a 3x3 conv; `edge` followed by `learnable`
  names the script family of `naked.edge.learnable.sobel...`: those models did NOT use the
  Canny edge input, so it sets no edge input (Variant.edge_family records it); any other
  `edge` is the Canny edge map added after res2, res3 and res4.

Model tokens choose the architecture; training tokens (lrN, scaleN, sizeS, bsN) override
the study's values; `cs`/`voc` name the data set; `trimap`/`edgemix` are label modes.
An unknown token, a lone half of a two-token name, or contradictory tokens (two
decoders, 1order and 2order, channelwise and channelcross, ...) raise SegdistError with
one line that lists the valid tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from segdist.errors import SegdistError

DECODERS = ("naked", "aspp", "fpn", "fpn.standard", "fpn.bilinear", "gcn")
FPN_DECODERS = ("fpn", "fpn.standard", "fpn.bilinear", "gcn")  # multi-level, output stride 32
LEARNABLE_KINDS = ("channelcross", "channelwise", "resblock")
EDGE_INPUTS = ("add", "scale", "conv3")
LABEL_MODES = ("hard", "trimap", "edgemix")
# Stages where modules can sit: after the stem pool, after res2..res5 (layer1..layer4).
STAGES = ("stem", "res2", "res3", "res4", "res5")
EDGE_STAGES = ("res2", "res3", "res4")
# Tokens that carry no meaning for the model (the log's family prefixes and markers).
NEUTRAL_TOKENS = ("deeplabv2", "resnet101", "py", "aug", "msf")

_NUMBERED = {
    "lr": "head_lr_mult",
    "scale": "epoch_scale",
    "size": "crop_size",
    "imagesize": "crop_size",
    "bs": "batch_size",
    "r": "edgemix_radius",
}
_NUMBERED_RE = re.compile(r"^(lr|scale|imagesize|size|bs|r)(\d+)$")
_FIXED_SOBEL = {"sobel": ("res2",), "sobellast": ("res4",), "sobel-res234": ("res2", "res3", "res4")}


@dataclass(frozen=True)
class Variant:
    """What a variant name says. For training values, None means: the study's own value."""

    name: str
    decoder: str = "naked"  # one of DECODERS
    dataset: str | None = None  # "voc" | "cityscapes" | None
    # training tokens (read by segdist.config.apply_variant_tokens)
    head_lr_mult: float | None = None
    epoch_scale: float | None = None
    crop_size: int | None = None
    batch_size: int | None = None
    randomresizefix: bool = False  # labels resized nearest; segdist always does, so a no-op marker
    full: bool = False  # `full`: train on the whole image (Cityscapes 1024x2048, bs1) instead of crops
    # learnable masked Sobel (`learnable.sobel`)
    learnable_sobel: str | None = None  # None | channelcross | channelwise | resblock
    sobel_order: int = 2  # 1: l + c1 + c2; 2: l + c1^2 + c2^2 (the original's default)
    sobel_relu: bool = False  # ReLU on c1, c2 before the sum
    sobel_init: str = "random"  # "random" (the original's variance scaling) | "sobel" (token `sobelinit`)
    learnable_sobel_at: tuple[str, ...] = ()  # stages (res2..res4, res5 with newcode) or ("laterals",)
    newcode: bool = False
    # fixed Sobel: stages where l + s*(gx^2 + gy^2) is applied
    fixed_sobel_at: tuple[str, ...] = ()
    # Canny edge input
    edge_input: str | None = None  # None | add | scale | conv3
    edge_family: bool = False  # `edge` before `learnable.sobel`: the script family, no edge input
    # SPK on the logits: 0 (none), 2 masks (spk), 4 masks (spk4)
    spk: int = 0
    # labels
    label_mode: str = "hard"  # hard | trimap | edgemix
    edgemix_radius: int = 1  # `rN` with edgemix

    @property
    def needs_edges(self) -> bool:
        return self.edge_input is not None

    @property
    def multi_level(self) -> bool:
        return self.decoder in FPN_DECODERS


def valid_tokens() -> list[str]:
    return [
        *NEUTRAL_TOKENS, "newcode", "voc", "cs",
        *DECODERS, "fpnstandard",
        "learnable.sobel", *LEARNABLE_KINDS, "1order", "2order", "relu", "sobelinit",
        "sobel", "sobellast", "sobel.head", "sobel-res234",
        "edge", "edgescale", "edge.conv3",
        "spk", "spk4", "trimap", "edgemix", "rN",
        "lrN", "scaleN", "sizeS", "imagesizeS", "bsN", "randomresizefix", "full",
    ]  # fmt: skip


def _tokens(name: str) -> list[str]:
    text = name.strip().lower()
    extra: list[str] = []
    if "(" in text:
        text, _, rest = text.partition("(")
        if not rest.endswith(")") or "(" in rest:
            raise SegdistError(f"variant {name!r}: brackets must close once at the end, as in naked.fpn(lr10,scale8)")
        extra = [t.strip() for t in rest.rstrip(")").split(",")]
    tokens = [t for t in text.split(".")] + extra
    if not text or any(not t for t in tokens):
        raise SegdistError(f"variant {name!r} has an empty token; write tokens separated by single dots")
    return tokens


def parse_variant(name: str) -> Variant:
    """Parse once; raise SegdistError naming the bad token and the valid ones."""
    if not isinstance(name, str):
        raise SegdistError(f"variant must be a string, got {name!r}")
    tokens = _tokens(name)
    fields: dict[str, object] = {}
    seen_from: dict[str, str] = {}  # field -> the token that set it (for contradictions)
    decoders: list[str] = []
    fixed: list[str] = []
    flags: set[str] = set()

    def bad(token: str, why: str = "unknown token") -> SegdistError:
        return SegdistError(f"{why} {token!r} in variant {name!r}; valid tokens: {', '.join(valid_tokens())}")

    def put(key: str, value: object, token: str) -> None:
        if key in fields and fields[key] != value:
            raise SegdistError(
                f"variant {name!r}: {seen_from[key]!r} and {token!r} contradict each other; "
                f"valid tokens: {', '.join(valid_tokens())}"
            )
        fields[key], seen_from[key] = value, token

    i = 0
    while i < len(tokens):
        token, after = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        step = 1
        number = _NUMBERED_RE.match(token)
        if number:
            key = _NUMBERED[number.group(1)]
            value = int(number.group(2))
            if value <= 0 and key != "edgemix_radius":
                raise bad(token, "non-positive number in")
            put(key, float(value) if key in ("head_lr_mult", "epoch_scale") else value, token)
        elif token in NEUTRAL_TOKENS:
            pass
        elif token == "newcode":
            fields["newcode"] = True
        elif token in ("cs", "voc"):
            put("dataset", "cityscapes" if token == "cs" else "voc", token)
        elif token == "naked" or token in ("aspp", "gcn"):
            decoders.append(token)
        elif token == "fpn":
            if after in ("standard", "bilinear"):
                decoders.append(f"fpn.{after}")
                step = 2
            else:
                decoders.append("fpn")
        elif token == "fpnstandard":
            decoders.append("fpn.standard")
        elif token == "learnable":
            if after != "sobel":
                raise bad(token, "'learnable' must be followed by 'sobel':")
            flags.add("learnable")
            step = 2
        elif token in LEARNABLE_KINDS:
            put("learnable_sobel", token, token)
        elif token in ("1order", "2order"):
            put("sobel_order", int(token[0]), token)
        elif token == "relu":
            fields["sobel_relu"] = True
            flags.add("relu")
        elif token == "sobelinit":
            fields["sobel_init"] = "sobel"
            flags.add("sobelinit")
        elif token == "sobel":
            if after == "head":
                fixed.append("stem")
                step = 2
            else:
                fixed.extend(_FIXED_SOBEL["sobel"])
        elif token in _FIXED_SOBEL:
            fixed.extend(_FIXED_SOBEL[token])
        elif token == "edge":
            if after == "learnable":
                fields["edge_family"] = True
            elif after == "conv3":
                put("edge_input", "conv3", "edge.conv3")
                step = 2
            else:
                put("edge_input", "add", token)
        elif token == "edgescale":
            put("edge_input", "scale", token)
        elif token in ("spk", "spk4"):
            put("spk", 2 if token == "spk" else 4, token)
        elif token in ("trimap", "edgemix"):
            put("label_mode", token, token)
        elif token in ("randomresizefix", "full"):
            fields[token] = True
        else:
            raise bad(token)
        i += step

    if len(set(decoders) - {"naked"}) > 1 or ("naked" in decoders and "aspp" in decoders):
        raise SegdistError(
            f"variant {name!r} names more than one decoder: {', '.join(dict.fromkeys(decoders))}; "
            f"valid tokens: {', '.join(valid_tokens())}"
        )
    decoder = next((d for d in decoders if d != "naked"), "naked")
    fields["decoder"] = decoder

    learnable = "learnable" in flags
    kind = fields.get("learnable_sobel")
    for key, token_name in (("learnable_sobel", kind), ("sobel_order", seen_from.get("sobel_order"))):
        if key in fields and not learnable:
            raise SegdistError(
                f"variant {name!r}: {token_name!r} only means something with 'learnable.sobel'; "
                f"valid tokens: {', '.join(valid_tokens())}"
            )
    if "relu" in flags and not learnable:
        raise SegdistError(f"variant {name!r}: 'relu' only means something with 'learnable.sobel'")
    if "sobelinit" in flags and not (learnable or "spk" in fields):
        raise SegdistError(f"variant {name!r}: 'sobelinit' only means something with 'learnable.sobel', 'spk' or 'spk4'")
    if learnable:
        kind = kind or "channelcross"
        fields["learnable_sobel"] = kind
        if kind == "resblock" and ("relu" in flags or "sobelinit" in flags):
            raise SegdistError(
                f"variant {name!r}: 'resblock' replaces the masked convs, so 'relu'/'sobelinit' contradict it"
            )
        if decoder in FPN_DECODERS:
            fields["learnable_sobel_at"] = ("laterals",)
        else:
            fields["learnable_sobel_at"] = ("res2", "res3", "res4", "res5") if fields.get("newcode") else ("res2", "res3", "res4")
    if "edgemix_radius" in fields and fields.get("label_mode") != "edgemix":
        raise SegdistError(f"variant {name!r}: {seen_from['edgemix_radius']!r} (window radius) needs 'edgemix'")
    fields["fixed_sobel_at"] = tuple(s for s in STAGES if s in fixed)
    return Variant(name=name, **fields)  # type: ignore[arg-type]
