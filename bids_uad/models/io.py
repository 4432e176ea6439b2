"""Model and checkpoint files: safetensors (tensors) + JSON (everything else). Never pickle.

A stored object ``<stem>`` is the pair ``<stem>.safetensors`` and ``<stem>.json``; the JSON
records the SHA-256 of the tensor file so a mismatched pair is refused.  Optimizer states
are flattened into named tensors plus JSON so checkpoints need no pickle either.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bids_uad.bids.derivatives import atomic_path, atomic_write
from bids_uad.errors import InputMissingError, InputValidationError

TENSOR_SUFFIX = ".safetensors"
META_SUFFIX = ".json"


def _stem(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix in (TENSOR_SUFFIX, META_SUFFIX):
        path = path.with_suffix("")
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_hash(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 over shapes, dtypes and bytes of arrays (identifies training data)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


#: a safetensors header larger than this is refused (the safetensors library's own limit)
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def foreign_format(head: bytes) -> str | None:
    """What a file is by its first bytes when it is a pickle or a zip archive (else None)."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save checkpoint?)"
    return None


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's size; data not read.

    Anything else (a pickle, a ``torch.save`` zip, a truncated file) is refused with
    :class:`InputValidationError` naming the file, without being unpickled.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        kind = foreign_format(head)
        if kind is not None:
            raise InputValidationError(f"not a safetensors file: {kind} (refused, never unpickled)", path)
        if len(head) < 8:
            raise InputValidationError("not a safetensors file (too short)", path)
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputValidationError(f"not a safetensors file (header size {n} for a file of {size} bytes)", path)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputValidationError("not a safetensors file (unreadable header)", path) from None
    if not isinstance(header, dict):
        raise InputValidationError("not a safetensors file (header is not a table)", path)
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if ok:
            begin, end = offsets
            ok = 0 <= begin <= end <= data_size and end - begin == int(np.prod(shape)) * _DTYPE_BYTES[entry["dtype"]]
        if not ok:
            raise InputValidationError(f"bad safetensors file: tensor {name!r}: dtype, shape or byte range "
                                       "inconsistent with the file", path)
    return header


def check_safetensors(path: str | Path) -> None:
    """Refuse anything that is not a well-formed safetensors file (e.g. a pickle or zip)."""
    read_safetensors_header(path)


def save_tensors(stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``stem.safetensors`` + ``stem.json`` atomically; return the JSON path.

    Each file goes through the derivatives' atomic writer (a uniquely named hidden temporary
    in the same folder, renamed into place, mode 0644), so concurrent writers never collide
    and a killed run's temporaries are removed by the next run's orphan sweep.
    """
    stem = _stem(stem)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(stem.with_suffix(TENSOR_SUFFIX)) as tmp_t:
        save_file(tensors, str(tmp_t))
        meta = dict(meta, tensor_sha256=file_sha256(tmp_t), format="bids_uad-safetensors-json/1")
    with atomic_write(stem.with_suffix(META_SUFFIX), "w") as handle:
        handle.write(json.dumps(meta, indent=1, sort_keys=True))
    return stem.with_suffix(META_SUFFIX)


def load_tensors(stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a pair written by :func:`save_tensors`, verifying format and hash."""
    stem = _stem(stem)
    t_path, j_path = stem.with_suffix(TENSOR_SUFFIX), stem.with_suffix(META_SUFFIX)
    for p in (t_path, j_path):
        if not p.is_file():
            raise InputMissingError("model file missing", p)
    check_safetensors(t_path)
    try:
        meta = json.loads(j_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputValidationError(f"invalid JSON: {exc}", j_path) from None
    if meta.get("tensor_sha256") != file_sha256(t_path):
        raise InputValidationError("tensor file does not match its JSON (hash differs)", t_path)
    return load_file(str(t_path)), meta


def flatten_optimizer(state: dict[str, Any], prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-safe remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        scalars[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars[str(idx)][key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "optim.") -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]  # JSON turned tuples (betas) into lists
    return {"state": state, "param_groups": groups}
