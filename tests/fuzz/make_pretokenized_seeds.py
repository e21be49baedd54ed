#!/usr/bin/env python3
# Why: fuzz_pretokenized starts from a few valid inputs (libFuzzer mutates from there far faster than from random
# bytes): Megatron .idx files, each preceded by the u32 size of its .bin, laid out exactly as Megatron-LM's
# indexed_dataset.py writes them, .npy headers as numpy writes them, and LLM360-style JSON lines. Remake: python3 tests/fuzz/make_pretokenized_seeds.py
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_pretokenized")
WIDTH = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 8: 2}


def megatron(code, docs):
    """docs: list of documents, each a list of sequence lengths."""
    lengths = [n for d in docs for n in d]
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * WIDTH[code]
    doc_index = [0]
    for d in docs:
        doc_index.append(doc_index[-1] + len(d))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    idx += struct.pack("<%di" % len(lengths), *lengths) + struct.pack("<%dq" % len(pointers), *pointers)
    idx += struct.pack("<%dq" % len(doc_index), *doc_index)
    return struct.pack("<I", p) + idx


def npy(descr, n, version=1):
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (descr, n)
    pre = 10 if version == 1 else 12
    d += " " * ((64 - (pre + len(d) + 1) % 64) % 64) + "\n"
    size = struct.pack("<H", len(d)) if version == 1 else struct.pack("<I", len(d))
    return b"\x93NUMPY" + bytes([version, 0]) + size + d.encode()


SEEDS = {
    "uint16-3docs.idx": megatron(8, [[3, 2], [4], [2]]),
    "int32-1doc.idx": megatron(4, [[5]]),
    "empty.idx": megatron(8, []),
    "u2.npy": npy("<u2", 8),
    "i8-v2.npy": npy("<i8", 3, version=2),
    "lines.jsonl": b'{"token_ids": [3, 1, 4]}\n\n{"token_ids": [1], "source": "web"}\n',
}

if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
        print(name, len(data), "bytes")
