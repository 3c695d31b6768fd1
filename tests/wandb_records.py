"""Read a W&B offline run back from disk (wandb 0.31 has no API for offline runs).

The `.wandb` file is a LevelDB-style log: a 7-byte header, 32 KiB blocks, records with a `<IHB>` header (crc32,
length, type: 1 full, 2/3/4 first/middle/last piece), each payload a `wandb_internal_pb2.Record`.
"""

import glob
import json
import os
import struct

BLOCK = 32 * 1024
HEADER = 7


def records(run_file: str):
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pieces = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        if length == 0 and kind == 0:  # block padding
            position += left_in_block - HEADER
            continue
        payload, position = data[position : position + length], position + length
        if kind in (2, 3):
            pieces += payload
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pieces + payload if kind == 4 else payload)
        pieces = b""
        yield record


def history(run_file: str) -> list[dict]:
    rows = []
    for record in records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(run_file: str) -> dict:
    """The run's config: what wandb.init received (in the `run` record) and every later update."""
    values = {}
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        values.update({item.key: json.loads(item.value_json) for item in updates})
    return values


def offline_runs(wandb_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")))
