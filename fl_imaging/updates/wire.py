"""What travels between server and sites: encoded updates as Flower records, and their size.

Flower glue for :mod:`fl_imaging.updates.compression` (which is free of Flower): an encoded
update becomes an ``ArrayRecord`` of its named arrays plus a ``ConfigRecord`` codec
header, and back. :func:`message_bytes` measures a message the way Flower ships it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl_imaging.protocol import RecordKey
from fl_imaging.updates.compression import Codec, CompressionError, EncodedUpdate


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ``ArrayRecord`` as tensor name -> NumPy array."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Tensor name -> NumPy array as an ``ArrayRecord`` (keeps each array's dtype)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def update_records(encoded: EncodedUpdate) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records of a training reply that carry ``encoded`` (keys ``update`` and ``codec``)."""
    return {
        RecordKey.UPDATE: to_record(encoded.arrays),
        RecordKey.CODEC: ConfigRecord(encoded.codec.header()),
    }


def read_update(content: RecordDict) -> EncodedUpdate:
    """The encoded update in a reply's content.

    Raises:
        CompressionError: the content lacks the ``update`` or ``codec`` record, or the
            codec header is invalid.
    """
    missing = [k.value for k in (RecordKey.UPDATE, RecordKey.CODEC) if k not in content]
    if missing:
        raise CompressionError(
            f"reply lacks the {missing} record(s) of an encoded update (got {list(content)})"
        )
    codec = Codec.from_header(dict(content[RecordKey.CODEC]))
    return EncodedUpdate(codec, to_numpy(content[RecordKey.UPDATE]))


def message_bytes(msg: Message) -> int:
    """Bytes of ``msg`` as Flower serialises it for transport.

    Flower 1.42 ships a message as a tree of content-addressed objects (message,
    records, arrays, array chunks); this is the sum of their serialised sizes, each
    distinct object once, as Flower pushes them. Transport framing (gRPC, TLS) is not
    included.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
