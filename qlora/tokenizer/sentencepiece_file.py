"""Reading a sentencepiece `tokenizer.model`: its pieces, scores, types and model type.

The file is a protobuf `ModelProto`. We read the few fields we need straight from the wire format
(a few lines; no protobuf dependency, and nothing in the file is ever executed).
"""

from __future__ import annotations

import struct
from pathlib import Path

from qlora.tokenizer.token_types import NORMAL


def read_sentencepiece_model(path: Path) -> tuple[list[str], list[float], list[int], int]:
    """(pieces, scores, types, model_type) from a sentencepiece ModelProto, by its wire format.

    Fields read (sentencepiece_model.proto): ModelProto.pieces = 1 {piece = 1 (string),
    score = 2 (float), type = 3 (enum, default NORMAL)}, ModelProto.trainer_spec = 2
    {model_type = 3 (enum, default UNIGRAM = 1; BPE = 2)}. Everything else is skipped.
    """
    data = path.read_bytes()
    pieces, scores, types, model_type = [], [], [], 1
    try:
        for number, value in _protobuf_fields(data):
            if number == 1:
                piece, score, kind = "", 0.0, NORMAL
                for sub_number, sub_value in _protobuf_fields(value):
                    if sub_number == 1:
                        piece = sub_value.decode("utf-8")
                    elif sub_number == 2:
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub_number == 3:
                        kind = sub_value
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2:
                for sub_number, sub_value in _protobuf_fields(value):
                    if sub_number == 3:
                        model_type = sub_value
    except (IndexError, ValueError, struct.error, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable sentencepiece model ({err})") from err
    if not pieces:
        raise ValueError(f"{path}: no pieces found; is it a sentencepiece model?")
    return pieces, scores, types, model_type


def _protobuf_fields(data: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = data[position : position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if position > len(data):
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
