#!/usr/bin/env python3
# Why: fuzz_shard needs a few valid KEELTOK1 shards to start from (libFuzzer mutates from there far faster than
# from random bytes). They are tiny and checked in under corpus/fuzz_shard/; this script documents how they were
# made and remakes them: python3 tests/fuzz/make_shard_seeds.py. Layout: core/data/shard.h, docs/data.md.
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_shard")


def shard(dtype, vocab, eos, tokens):
    header = b"KEELTOK1" + struct.pack("<IIIIQ", 1, dtype, vocab, eos, len(tokens))
    return header + struct.pack("<%d%s" % (len(tokens), "H" if dtype == 1 else "I"), *tokens)


SEEDS = {
    "u16-vocab2048.tok": shard(1, 2048, 1, [5, 17, 2047, 1, 0, 300, 1]),
    "u32-vocab100000.tok": shard(2, 100000, 3, [99999, 3, 65536, 7]),
    "empty.tok": shard(1, 16, 0, []),
}

if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
        print(name, len(data), "bytes")
