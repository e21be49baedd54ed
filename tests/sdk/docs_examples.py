#!/usr/bin/env python3
"""Why: docs/plugins.md is where plugin authors learn the SDK, so its code must stay true to the header.
Two jobs, no Keel needed:
  docs_examples.py extract DOC OUT_DIR   writes every ```cpp block of DOC whose first line is
                                         `#include <keel/plugin.h>` to OUT_DIR/doc_example_N.cpp (rewritten only
                                         when changed) and prints their paths, one per line (CMake builds each
                                         as a plugin against the SDK alone)
  docs_examples.py check DOC HEADER      every line of the reference block (the ```cpp block after the heading
                                         "## Reference: every hook and type") must appear in HEADER, modulo
                                         leading whitespace and `public:`/`override` noise; exit 1 naming each
                                         line that does not"""
import os
import re
import sys


def cpp_blocks(doc_text):
    """(heading, block text) for every ```cpp fenced block, with the nearest ## heading above it."""
    blocks, heading, inside, lines = [], "", False, []
    for line in doc_text.splitlines():
        if not inside and line.startswith("## "):
            heading = line[3:].strip()
        if not inside and line.strip() == "```cpp":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append((heading, "\n".join(lines) + "\n"))
        elif inside:
            lines.append(line)
    return blocks


def extract(doc, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for _, text in cpp_blocks(open(doc).read()):
        if not text.startswith("#include <keel/plugin.h>\n"):
            continue
        path = os.path.join(out_dir, f"doc_example_{n}.cpp")
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            with open(path, "w") as f:
                f.write(text)
        print(path)
        n += 1
    if n == 0:
        sys.exit(f"{doc}: no ```cpp block starts with #include <keel/plugin.h>")


def check(doc, header):
    normal = lambda s: re.sub(r"\s+", " ", s).strip()
    header_lines = {normal(l) for l in open(header).read().splitlines()}
    refs = [text for heading, text in cpp_blocks(open(doc).read()) if heading == "Reference: every hook and type"]
    if not refs:
        sys.exit(f"{doc}: no ```cpp block under '## Reference: every hook and type'")
    missing = []
    for text in refs:
        for line in text.splitlines():
            key = normal(line)
            if key in ("", "};", "class Plugin {"):
                continue
            if key not in header_lines:
                missing.append(line.strip())
    for line in missing:
        print(f"{doc}: reference line not in {header}: {line}")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "extract":
        extract(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
