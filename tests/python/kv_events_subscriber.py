"""Reads tandem's KV events from a ZMQ PUB socket the way consumers of vLLM's events do:
pyzmq SUB socket, multipart (topic, 8-byte big-endian sequence, msgpack payload), payload
decoded by msgspec into vLLM's KVEventBatch shapes (array-like tagged structs).

Prints "subscribed", then one JSON line per decoded event.
    python kv_events_subscriber.py tcp://127.0.0.1:20082
"""
import json
import sys

import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def main() -> None:
    sock = zmq.Context().socket(zmq.SUB)
    sock.connect(sys.argv[1])
    sock.setsockopt_string(zmq.SUBSCRIBE, "")
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    print("subscribed", flush=True)
    while True:
        topic, seq, payload = sock.recv_multipart()
        batch = decoder.decode(payload)
        for ev in batch.events:
            out = {"topic": topic.decode(), "seq": int.from_bytes(seq, "big"),
                   "type": type(ev).__name__}
            if isinstance(ev, BlockStored):
                out.update(block_size=ev.block_size, num_blocks=len(ev.block_hashes),
                           token_ids=ev.token_ids, parent=ev.parent_block_hash, medium=ev.medium)
            elif isinstance(ev, BlockRemoved):
                out.update(num_blocks=len(ev.block_hashes))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
