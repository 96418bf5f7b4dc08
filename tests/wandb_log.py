"""A minimal reader of a wandb run file (`run-<id>.wandb`) for tests: a second implementation that checks what
wandb stored, independent of wandb's own (Go) reader. Format: a 7-byte header (":W&B", magic 0xBEE1, version),
then LevelDB log records (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks,
each holding a serialized `wandb_internal_pb2.Record`."""

from pathlib import Path

BLOCK = 32768
HEADER = 7


def raw_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        chunk = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def logged(path: Path) -> dict[str, dict[str, str]]:
    """{"history": {key: value_json}, "summary": {...}, "config": {...}} (later values win)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, dict[str, str]] = {"history": {}, "summary": {}, "config": {}}
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in ("history", "summary"):
            items = getattr(record, kind).item if kind == "history" else record.summary.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            out[kind][item.key or "/".join(item.nested_key)] = item.value_json
    return out
