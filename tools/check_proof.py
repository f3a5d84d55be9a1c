#!/usr/bin/env python3
"""Check a Ciyuan inclusion proof with nothing but the Python standard library.

Usage: python3 tools/check_proof.py proof.json   (the output of `ciyuan audit prove ID`)

It recomputes the entry's RFC 6962 leaf hash, walks the inclusion proof up to the root
(RFC 9162, section 2.1.3.2), checks that root against the checkpoint text, and checks the
checkpoint's C2SP signed-note signature with the Ed25519 verifier key. Exit 0 means all
of it holds. It shares no code with Ciyuan on purpose: it is the auditor's own check.
Ed25519 verification follows RFC 8032 section 5.1.7 (plain integer arithmetic: slow,
but one signature takes milliseconds).
"""
import base64
import hashlib
import json
import sys


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: list) -> bytes:
    if index >= size:
        raise ValueError("index out of range")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ValueError("proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("proof too short")
    return r


# --- Ed25519 verification (RFC 8032) ---------------------------------------------------
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _recover_x(y: int, sign: int):
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


def _add(a, b):
    A = (a[1] - a[0]) * (b[1] - b[0]) % P
    B = (a[1] + a[0]) * (b[1] + b[0]) % P
    C = 2 * a[3] * b[3] * D % P
    Dd = 2 * a[2] * b[2] % P
    E, F, G, H = B - A, Dd - C, Dd + C, B + A
    return (E * F % P, G * H % P, F * G % P, E * H % P)


def _mul(s: int, pt):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, pt)
        pt = _add(pt, pt)
        s >>= 1
    return q


def _equal(a, b) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


def _decompress(s: bytes):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


_GY = 4 * pow(5, P - 2, P) % P
_G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % P)


def ed25519_verify(public: bytes, msg: bytes, sig: bytes) -> bool:
    if len(sig) != 64:
        return False
    a = _decompress(public)
    r = _decompress(sig[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= L:
        return False
    h = int.from_bytes(hashlib.sha512(sig[:32] + public + msg).digest(), "little") % L
    return _equal(_mul(s, _G), _add(r, _mul(h, a)))


# --- C2SP signed note and checkpoint ---------------------------------------------------
def check_note(note: str, vkey: str) -> str:
    """Returns the note's text if a signature by vkey verifies, else raises."""
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64, validate=True)
    if key[0] != 1 or len(key) != 33:
        raise ValueError("verifier key is not an Ed25519 key")
    public = key[1:]
    key_id = hashlib.sha256(name.encode() + b"\n" + key).digest()[:4]
    if key_id.hex() != key_id_hex:
        raise ValueError("verifier key id does not match its key")
    split = note.rfind("\n\n")
    if split < 0:
        raise ValueError("note has no signature block")
    text, sigs = note[: split + 1], note[split + 2 :]
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            raise ValueError("malformed signature line")
        sig_name, sig_b64 = line[2:].split(" ")
        raw = base64.b64decode(sig_b64, validate=True)
        if sig_name == name and raw[:4] == key_id:
            if ed25519_verify(public, text.encode(), raw[4:]):
                return text
            raise ValueError("checkpoint signature does not verify")
    raise ValueError("no signature by the given key")


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        proof = json.load(f)
    entry = proof["entry"].encode()
    leaf = leaf_hash(entry)
    if base64.b64encode(leaf).decode() != proof["leaf_hash"]:
        print("FAIL: leaf hash does not match the entry")
        return 1
    path = [base64.b64decode(h, validate=True) for h in proof["proof"]]
    root = root_from_inclusion(proof["entry_id"], proof["tree_size"], leaf, path)
    text = check_note(proof["checkpoint"], proof["public_key"])
    lines = text.split("\n")
    origin, size, root_b64 = lines[0], int(lines[1]), lines[2]
    if size != proof["tree_size"] or base64.b64decode(root_b64) != root:
        print("FAIL: the proof does not lead to the signed checkpoint's root")
        return 1
    print(f"ok: entry {proof['entry_id']} is in {origin} at size {size}, signature valid")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, IndexError) as e:
        print(f"FAIL: {e}")
        sys.exit(1)
