"""The grader's wire format: framed messages of plain JSON plus raw tensor bytes, decoded within fixed bounds.

A worker's messages are untrusted, so nothing here unpickles, decompresses or formats what it reads: a frame is
an 8-byte little-endian length (at most MAX_MESSAGE), then a 4-byte header length, a UTF-8 JSON header (at most
MAX_HEADER bytes, nesting at most MAX_DEPTH, at most MAX_NODES values) and a blob of raw tensor bytes that the
header indexes. A tensor is rebuilt only when its dtype is a plain number type and shape x item size equals its
byte count, inside the blob. The grader's own messages to the worker (the job and the test inputs) are trusted
and use `torch.save` instead (`encode_trusted`).
"""
from __future__ import annotations

import io
import json
import math
import struct

import torch

MAX_MESSAGE = 16 << 20  # a frame, header and tensors together
MAX_HEADER = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 50_000
MAX_DIMS = 8
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_TENSOR = "$tensor"


class BadMessage(ValueError):
    """A frame that breaks the format or its bounds."""


def frame(payload: bytes) -> bytes:
    """One frame: the payload's length as 8 little-endian bytes, then the payload."""
    return struct.pack("<Q", len(payload)) + payload


def encode(obj) -> bytes:
    """A frame holding dicts (str keys), lists, tuples, str, int, float, bool, None and plain tensors."""
    blobs: list[bytes] = []
    offset = 0

    def plain(x, depth=0):
        nonlocal offset
        if depth > MAX_DEPTH:
            raise ValueError("message nested too deeply")
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$float": repr(x)}
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if str(t.dtype).removeprefix("torch.") not in _DTYPES:
                t = t.double()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            record = {_TENSOR: [str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(data)]}
            blobs.append(data)
            offset += len(data)
            return record
        if isinstance(x, (list, tuple)):
            return [plain(v, depth + 1) for v in x]
        if isinstance(x, dict):
            return {str(k): plain(v, depth + 1) for k, v in x.items()}
        raise TypeError(f"cannot send a {type(x).__name__}")

    header = json.dumps(plain(obj), allow_nan=False).encode()
    return frame(struct.pack("<I", len(header)) + header + b"".join(blobs))


def _check_shape(spec) -> tuple[torch.dtype, list[int], int, int]:
    if not (isinstance(spec, list) and len(spec) == 4):
        raise BadMessage("a tensor record that is not [dtype, shape, offset, nbytes]")
    name, shape, offset, nbytes = spec
    if not isinstance(name, str) or name not in _DTYPES:
        raise BadMessage("a tensor of an unknown dtype")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(n) is int and 0 <= n <= MAX_MESSAGE for n in shape)):
        raise BadMessage("a tensor with a malformed shape")
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
        raise BadMessage("a tensor with a malformed offset")
    dtype = _DTYPES[name]
    numel = math.prod(shape)
    if numel * torch.empty((), dtype=dtype).element_size() != nbytes:
        raise BadMessage("a tensor whose shape does not match its bytes")
    return dtype, shape, offset, nbytes


def decode(payload: bytes):
    """The object in an untrusted frame's payload, rebuilt within the bounds above; BadMessage otherwise."""
    if len(payload) > MAX_MESSAGE or len(payload) < 4:
        raise BadMessage(f"a message of {len(payload)} bytes")
    (size,) = struct.unpack_from("<I", payload)
    if size > MAX_HEADER or 4 + size > len(payload):
        raise BadMessage("a header larger than allowed or than the message")
    try:
        header = json.loads(payload[4: 4 + size].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 4,300-digit int, nesting past the C stack
        raise BadMessage(f"an unreadable header ({type(e).__name__})") from None
    blob = memoryview(payload)[4 + size:]
    nodes = 0

    def rebuild(x, depth=0):
        nonlocal nodes
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise BadMessage("a header nested too deeply or with too many values")
        if isinstance(x, list):
            return [rebuild(v, depth + 1) for v in x]
        if isinstance(x, dict):
            if _TENSOR in x:
                dtype, shape, offset, nbytes = _check_shape(x[_TENSOR])
                if offset + nbytes > len(blob):
                    raise BadMessage("a tensor past the end of the message")
                data = bytearray(blob[offset: offset + nbytes])
                return torch.frombuffer(data, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
            if "$float" in x:
                return float(x["$float"]) if x["$float"] in ("nan", "inf", "-inf") else None
            return {k: rebuild(v, depth + 1) for k, v in x.items()}
        return x

    return rebuild(header)


def encode_trusted(obj) -> bytes:
    """A frame for the grader's own messages to the worker (torch.save: inputs may hold toy model objects)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return frame(buf.getvalue())


def decode_trusted(payload: bytes):
    """The grader's message, read inside the worker (the grader is trusted there)."""
    return torch.load(io.BytesIO(payload), weights_only=False)
