"""Parse a results-log variant name into a typed, frozen Variant (reference/variants.md).

A name is dot-separated tokens, exactly as in the log:

    deeplabv2.naked.fpn.learnable.sobel.channelwise.1order
    deeplabv2.naked.edge.learnable.sobel.channelwise.lr10.newcode
    deeplabv2.cs.resnet101.scale8(randomresizefix,full,aug,bs1,msf)

The log's parenthesised form `deeplabv2.naked.fpn.standard(lr10,scale8)` is accepted too:
the comma-separated words in the brackets are more tokens. Case is ignored.

Some tokens are read together with the next one:
- `learnable.sobel` is the learnable masked-Sobel module (`learnable` alone is an error);
- `sobel.head` is the fixed Sobel after the stem; any other `sobel` is the fixed Sobel
  after res2 (`sobellast`: after res4; `sobel-res234`: after res2, res3 and res4);
- `fpn.standard` (also `fpnstandard`) and `fpn.bilinear` are decoders;
- `edge.conv3` is the edge input through a 3x3 conv; `edge` followed by `learnable` names
  the script family of `naked.edge.learnable.sobel...`: those models did NOT use the Canny
  edge input, so it sets no edge input (Variant.edge_family records it); any other `edge`
  is the Canny edge map added after res2, res3 and res4.

A Variant says only what its tokens say; segdist.resolve turns it and a study's values into
the full recipe (segdist.recipe) (what an absent token means depends on the protocol and the script family).
Token groups:
- decoders: naked, aspp, fpn, fpn.standard, fpn.bilinear, gcn, and `resnet101`: the plain
  ResNet-101 (output stride 32) with a basic-block classifier of `deeplabv2.cs.resnet101.*`;
- modules: learnable.sobel [channelwise|channelcross|resblock], sobel, sobellast, sobel.head,
  sobel-res234, edge, edgescale, edge.conv3, spk, spk4, newcode (module on res5 as well);
- module formulas: 1order, 2order, sqrt (learnable Sobel); square, sqrt (fixed Sobel); relu;
  sobelinit;
- training: lrN, scaleN, sizeS / imagesizeS, bsN (per GPU), Ngpu (workers), full (the
  whole Cityscapes frame), aug (random resize with `full`), trimap, edgemix, rN;
- data sets: voc, cs; markers without effect: deeplabv2, py, msf, randomresizefix (segdist
  always resizes labels nearest and fixes that script's width/height swap).

An unknown token, a lone half of a two-token name, or contradictory tokens (two decoders,
1order and 2order, channelwise and channelcross, ...) raise SegdistError with one line that
lists the valid tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from segdist.errors import SegdistError

DECODERS = ("naked", "aspp", "fpn", "fpn.standard", "fpn.bilinear", "gcn", "plain")
FPN_DECODERS = ("fpn", "fpn.standard", "fpn.bilinear", "gcn")  # multi-level, output stride 32
LEARNABLE_KINDS = ("channelcross", "channelwise", "resblock")
EDGE_INPUTS = ("add", "scale", "conv3")
LABEL_MODES = ("hard", "trimap", "edgemix")  # what a trimap/edgemix token sets (segdist.data.transforms)
# Stages where modules can sit: after the stem pool, after res2..res5 (layer1..layer4).
STAGES = ("stem", "res2", "res3", "res4", "res5")
EDGE_STAGES = ("res2", "res3", "res4")
# Tokens that carry no meaning for the recipe (the log's family prefixes and markers).
NEUTRAL_TOKENS = ("deeplabv2", "py", "msf", "randomresizefix")

_NUMBERED = {
    "lr": "lr_mult",
    "scale": "epoch_scale",
    "size": "crop_size",
    "imagesize": "crop_size",
    "bs": "batch_size",
    "r": "edgemix_radius",
}
_NUMBERED_RE = re.compile(r"^(lr|scale|imagesize|size|bs|r)(\d+)$")
_GPU_RE = re.compile(r"^(\d+)gpu$")
_FIXED_SOBEL = {"sobel": ("res2",), "sobellast": ("res4",), "sobel-res234": ("res2", "res3", "res4")}


@dataclass(frozen=True)
class Variant:
    """What a variant name says. None means: the token is absent (the recipe decides)."""

    name: str
    decoder: str = "naked"  # one of DECODERS
    # the original's script family, whose defaults apply (segdist.protocols): fpn (FPN/GCN), plain
    # (resnet101), voc (deeplabv2.voc.*: experiments/resnet_model.py), naked (deeplabv2.naked*.py)
    family: str = "naked"
    dataset: str | None = None  # "voc" | "cityscapes" | None
    # training tokens
    lr_mult: float | None = None  # lrN: the multiplier of the modules the family's patterns name
    epoch_scale: float | None = None  # scaleN: one epoch = N passes (per GPU)
    crop_size: int | None = None  # sizeS / imagesizeS
    batch_size: int | None = None  # bsN, per GPU
    workers: int | None = None  # Ngpu
    full: bool = False  # the whole 1024x2048 Cityscapes frame as the crop
    aug: bool = False  # with `full`: random resize before the crop (without it: flip only)
    randomresizefix: bool = False  # a marker: segdist always resizes labels nearest
    newcode: bool = False  # learnable Sobel on res5 too (and, by date, no classifier bias)
    # learnable masked Sobel (`learnable.sobel`)
    learnable_sobel: str | None = None  # None | channelcross | channelwise | resblock
    learnable_sobel_at: tuple[str, ...] = ()  # stages, or ("laterals",) on FPN/GCN decoders
    sobel_form: str | None = None  # 1order | 2order | sqrt (learnable); square | sqrt (fixed)
    sobel_relu: bool = False  # ReLU on c1, c2 before the sum
    sobel_init: str = "random"  # "random" (the original's variance scaling) | "sobel" (`sobelinit`)
    # fixed Sobel: stages where l + s * f(gx^2 + gy^2) is applied
    fixed_sobel_at: tuple[str, ...] = ()
    # Canny edge input
    edge_input: str | None = None  # None | add | scale | conv3
    edge_family: bool = False  # `edge` before `learnable.sobel`: the script family, no edge input
    # SPK on the logits: 0 (none), 2 masks (spk), 4 masks (spk4)
    spk: int = 0
    # labels
    label_mode: str = "hard"  # hard | trimap | edgemix
    edgemix_radius: int = 1  # `rN` with edgemix


def valid_tokens() -> list[str]:
    return [
        *NEUTRAL_TOKENS, "newcode", "voc", "cs", "resnet101",
        *(d for d in DECODERS if d != "plain"), "fpnstandard",
        "learnable.sobel", *LEARNABLE_KINDS, "1order", "2order", "sqrt", "square", "relu", "sobelinit",
        "sobel", "sobellast", "sobel.head", "sobel-res234",
        "edge", "edgescale", "edge.conv3",
        "spk", "spk4", "trimap", "edgemix", "rN",
        "lrN", "scaleN", "sizeS", "imagesizeS", "bsN", "Ngpu", "full", "aug",
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


class _Parse:
    """The state of one parse: fields set so far, and which token set each (for contradictions)."""

    def __init__(self, name: str):
        self.name = name
        self.fields: dict[str, object] = {}
        self.seen_from: dict[str, str] = {}
        self.decoders: list[str] = []
        self.fixed: list[str] = []
        self.flags: set[str] = set()

    def bad(self, token: str, why: str = "unknown token") -> SegdistError:
        return SegdistError(f"{why} {token!r} in variant {self.name!r}; valid tokens: {', '.join(valid_tokens())}")

    def put(self, key: str, value: object, token: str) -> None:
        if key in self.fields and self.fields[key] != value:
            raise SegdistError(
                f"variant {self.name!r}: {self.seen_from[key]!r} and {token!r} contradict each other; "
                f"valid tokens: {', '.join(valid_tokens())}"
            )
        self.fields[key], self.seen_from[key] = value, token

    def token(self, token: str, after: str | None) -> int:
        """Read one token (and maybe the next); returns how many were read."""
        number, gpus = _NUMBERED_RE.match(token), _GPU_RE.match(token)
        if number:
            return self._read_numbered(token, number)
        if gpus:
            return self._read_gpus(token, gpus)
        read = _TOKEN_READERS.get(token)
        if read is None:
            raise self.bad(token)
        return read(self, token, after)

    # Each _read_* reads one group of tokens and returns how many tokens it read: its docstring
    # lists the tokens, then that count (2: it read the next token, `after`, too).

    def _read_numbered(self, token: str, number: re.Match[str]) -> int:
        """lrN, scaleN (floats), sizeS, imagesizeS, bsN (positive ints), rN (any int): 1."""
        key, value = _NUMBERED[number.group(1)], int(number.group(2))
        if value <= 0 and key != "edgemix_radius":
            raise self.bad(token, "non-positive number in")
        self.put(key, float(value) if key in ("lr_mult", "epoch_scale") else value, token)
        return 1

    def _read_gpus(self, token: str, gpus: re.Match[str]) -> int:
        """Ngpu (workers, at least 1): 1."""
        if int(gpus.group(1)) < 1:
            raise self.bad(token, "non-positive number in")
        self.put("workers", int(gpus.group(1)), token)
        return 1

    def _read_marker(self, token: str, after: str | None) -> int:
        """Markers (deeplabv2, py, msf, randomresizefix) and switches (newcode, full, aug): 1."""
        if token in NEUTRAL_TOKENS:
            if token == "randomresizefix":
                self.fields["randomresizefix"] = True
        else:
            self.fields[token] = True
        return 1

    def _read_dataset(self, token: str, after: str | None) -> int:
        """cs or voc: 1."""
        self.put("dataset", "cityscapes" if token == "cs" else "voc", token)
        self.flags.add(token)
        return 1

    def _read_decoder(self, token: str, after: str | None) -> int:
        """naked, aspp, gcn, resnet101 (plain), fpnstandard, fpn: 1; fpn.standard, fpn.bilinear: 2."""
        if token == "fpn" and after in ("standard", "bilinear"):
            self.decoders.append(f"fpn.{after}")
            return 2
        self.decoders.append(_DECODER_TOKENS[token])
        return 1

    def _read_learnable(self, token: str, after: str | None) -> int:
        """learnable.sobel: 2 (`learnable` alone is an error)."""
        if after != "sobel":
            raise self.bad(token, "'learnable' must be followed by 'sobel':")
        self.flags.add("learnable")
        return 2

    def _read_sobel_option(self, token: str, after: str | None) -> int:
        """A Sobel module's kind (channelcross, ...), formula (1order, 2order, sqrt, square),
        relu or sobelinit: 1."""
        if token in LEARNABLE_KINDS:
            self.put("learnable_sobel", token, token)
        elif token == "relu":
            self.fields["sobel_relu"] = True
            self.flags.add(token)
        elif token == "sobelinit":
            self.fields["sobel_init"] = "sobel"
            self.flags.add(token)
        else:
            self.put("sobel_form", token, token)
        return 1

    def _read_fixed_sobel(self, token: str, after: str | None) -> int:
        """sobel, sobellast, sobel-res234: 1; sobel.head: 2."""
        if token == "sobel" and after == "head":
            self.fixed.append("stem")
            return 2
        self.fixed.extend(_FIXED_SOBEL[token])
        return 1

    def _read_edge(self, token: str, after: str | None) -> int:
        """edge (the Canny input, or the script family before learnable), edgescale: 1; edge.conv3: 2."""
        if token == "edgescale":
            self.put("edge_input", "scale", token)
        elif after == "learnable":
            self.fields["edge_family"] = True
        elif after == "conv3":
            self.put("edge_input", "conv3", "edge.conv3")
            return 2
        else:
            self.put("edge_input", "add", token)
        return 1

    def _read_output(self, token: str, after: str | None) -> int:
        """spk, spk4 (SPK on the logits) or trimap, edgemix (the label mode): 1."""
        if token in ("spk", "spk4"):
            self.put("spk", 2 if token == "spk" else 4, token)
        else:
            self.put("label_mode", token, token)
        return 1


# The decoder each decoder token names (fpn.standard, fpn.bilinear: _Parse._read_decoder).
_DECODER_TOKENS = {
    "naked": "naked",
    "aspp": "aspp",
    "gcn": "gcn",
    "resnet101": "plain",
    "fpn": "fpn",
    "fpnstandard": "fpn.standard",
}
# How _Parse.token reads each literal token (numbered ones, lrN ... Ngpu, are matched first).
_TOKEN_READERS: dict[str, Callable[[_Parse, str, str | None], int]] = {
    **dict.fromkeys((*NEUTRAL_TOKENS, "newcode", "full", "aug"), _Parse._read_marker),
    **dict.fromkeys(("cs", "voc"), _Parse._read_dataset),
    **dict.fromkeys(_DECODER_TOKENS, _Parse._read_decoder),
    "learnable": _Parse._read_learnable,
    **dict.fromkeys(
        (*LEARNABLE_KINDS, "1order", "2order", "sqrt", "square", "relu", "sobelinit"), _Parse._read_sobel_option
    ),
    **dict.fromkeys(_FIXED_SOBEL, _Parse._read_fixed_sobel),
    **dict.fromkeys(("edge", "edgescale"), _Parse._read_edge),
    **dict.fromkeys(("spk", "spk4", "trimap", "edgemix"), _Parse._read_output),
}


def parse_variant(name: str) -> Variant:
    """Parse once; raise SegdistError naming the bad token and the valid ones."""
    if not isinstance(name, str):
        raise SegdistError(f"variant must be a string, got {name!r}")
    tokens = _tokens(name)
    state = _Parse(name)
    i = 0
    while i < len(tokens):
        i += state.token(tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None)
    fields = state.fields
    fields["decoder"] = decoder = _decoder(state)
    fields["family"] = _family(decoder, state)
    _check_modules(state, decoder)
    fields["fixed_sobel_at"] = tuple(s for s in STAGES if s in state.fixed)
    return Variant(name=name, **fields)  # type: ignore[arg-type]


def _decoder(state: _Parse) -> str:
    named = list(dict.fromkeys(state.decoders))
    if len(set(named) - {"naked"}) > 1 or ("naked" in named and ("aspp" in named or "plain" in named)):
        raise SegdistError(
            f"variant {state.name!r} names more than one decoder: {', '.join(named)}; "
            f"valid tokens: {', '.join(valid_tokens())}"
        )
    return next((d for d in named if d != "naked"), "naked")


def _family(decoder: str, state: _Parse) -> str:
    if decoder in FPN_DECODERS:
        return "fpn"
    if decoder == "plain":
        return "plain"
    if not state.decoders and "voc" in state.flags:
        return "voc"  # deeplabv2.voc.* (experiments/): the naked model from another file
    return "naked"


def _check_modules(state: _Parse, decoder: str) -> None:
    """Tokens that need another token, and the learnable Sobel's placement."""
    fields, name = state.fields, state.name
    learnable = "learnable" in state.flags
    form = fields.get("sobel_form")
    for token in (fields.get("learnable_sobel"), form if form in ("1order", "2order") else None):
        if token is not None and not learnable:
            raise SegdistError(f"variant {name!r}: {token!r} only means something with 'learnable.sobel'; "
                               f"valid tokens: {', '.join(valid_tokens())}")
    if form == "square" and not state.fixed:
        raise SegdistError(f"variant {name!r}: 'square' only means something with a fixed 'sobel'")
    if form == "sqrt" and not (learnable or state.fixed):
        raise SegdistError(f"variant {name!r}: 'sqrt' only means something with 'learnable.sobel' or 'sobel'")
    if form == "sqrt" and learnable and state.fixed:
        raise SegdistError(f"variant {name!r}: 'sqrt' is ambiguous with both a learnable and a fixed Sobel")
    if "relu" in state.flags and not learnable:
        raise SegdistError(f"variant {name!r}: 'relu' only means something with 'learnable.sobel'")
    if "sobelinit" in state.flags and not (learnable or "spk" in fields):
        raise SegdistError(f"variant {name!r}: 'sobelinit' only means something with 'learnable.sobel', 'spk' or 'spk4'")
    if learnable:
        kind = fields.setdefault("learnable_sobel", "channelcross")
        if kind == "resblock" and ({"relu", "sobelinit"} & state.flags or form == "sqrt"):
            raise SegdistError(
                f"variant {name!r}: 'resblock' replaces the masked convs, so 'relu'/'sobelinit'/'sqrt' contradict it"
            )
        if decoder in FPN_DECODERS:
            fields["learnable_sobel_at"] = ("laterals",)
        else:
            fields["learnable_sobel_at"] = ("res2", "res3", "res4", "res5") if fields.get("newcode") else (
                "res2", "res3", "res4")
    if "edgemix_radius" in fields and fields.get("label_mode") != "edgemix":
        raise SegdistError(f"variant {name!r}: {state.seen_from['edgemix_radius']!r} (window radius) needs 'edgemix'")
    if fields.get("aug") and not fields.get("full"):
        raise SegdistError(f"variant {name!r}: 'aug' only means something with 'full' (crops always get random resize)")
    if fields.get("full") and fields.get("dataset") != "cityscapes":
        raise SegdistError(f"variant {name!r}: 'full' is the whole 1024x2048 Cityscapes frame: it needs 'cs'")
    if fields.get("full") and "crop_size" in fields:
        raise SegdistError(f"variant {name!r}: 'full' (the whole frame) and {state.seen_from['crop_size']!r} "
                           "contradict each other")
