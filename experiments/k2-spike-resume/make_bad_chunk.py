#!/usr/bin/env python3
"""Why: the k2-spike-resume experiment needs a misbehaving data chunk that reliably spikes the loss of a small
model. This writes one: a binary blob that was decoded as Latin-1 and saved as UTF-8 text (mojibake, a classic
crawl-pipeline accident). Its 96 characters (U+00A0..U+00FF) are all but absent from the prose and code sources,
so the model has learnt to give them almost no probability, and the first batch of them jumps the loss from ~4-6
to ~12. 96 distinct characters also keep SentencePiece happy: a chunk of random CJK (thousands of characters)
makes tokenizer training fail with "Vocabulary size is smaller than required_chars".
Deterministic (fixed seed): the same bytes on every machine. Usage: make_bad_chunk.py OUT_FILE [KIB]"""
import random
import sys


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: make_bad_chunk.py OUT_FILE [KIB]")
    out, kib = sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 20
    rng = random.Random(7)
    lines, size = [], 0
    while size < kib * 1000:
        line = "".join(chr(rng.randint(0xA0, 0xFF)) for _ in range(64))  # 64 characters, 128 UTF-8 bytes
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
