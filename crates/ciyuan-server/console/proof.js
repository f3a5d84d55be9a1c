// Checking an entry's inclusion proof and its checkpoint's signature in the browser,
// with WebCrypto only: SHA-256 (RFC 6962 leaf and node hashes, RFC 9162 §2.1.3.2) and
// Ed25519 over the C2SP signed note. Nothing here takes the server's word for it.

const enc = new TextEncoder();

function b64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

function equal(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** SHA-256(0x00 || entry): the leaf hash of an entry's bytes. */
export async function leafHash(entryBytes) {
  return sha256(concat(new Uint8Array([0]), entryBytes));
}

async function nodeHash(left, right) {
  return sha256(concat(new Uint8Array([1]), left, right));
}

/** The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or null if it cannot. */
export async function rootFromInclusion(leaf, index, size, proof) {
  let fn = BigInt(index);
  let sn = BigInt(size) - 1n;
  if (fn > sn) return null;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0n) return null;
    if ((fn & 1n) === 1n || fn === sn) {
      r = await nodeHash(p, r);
      if ((fn & 1n) === 0n) {
        while ((fn & 1n) === 0n && fn !== 0n) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  return sn === 0n ? r : null;
}

/** Parses a C2SP verifier key `name+hash+base64(0x01 || key)`. */
export function parseVerifierKey(vkey) {
  // The key's base64 may hold "+" itself: only the first two separate fields.
  const m = /^([^+\s]+)\+([0-9a-f]{8})\+(\S+)$/.exec(vkey.trim());
  if (!m) throw new Error("verifier key is not name+hash+key");
  const parts = [m[1], m[2], m[3]];
  const raw = b64(parts[2]);
  if (raw.length !== 33 || raw[0] !== 1) throw new Error("verifier key is not an Ed25519 key");
  return { name: parts[0], id: parts[1], key: raw.slice(1), raw };
}

/**
 * Checks a C2SP signed note against a verifier key; answers the note's body lines
 * (origin, size, root) when a signature by that key verifies, else throws.
 */
export async function verifyNote(note, vkey) {
  const k = parseVerifierKey(vkey);
  const split = note.indexOf("\n\n");
  if (split < 0) throw new Error("the checkpoint is not a signed note");
  const body = note.slice(0, split + 1);
  const sigs = note.slice(split + 2).split("\n").filter(Boolean);
  // The key id: the first 4 bytes of SHA-256(name || "\n" || 0x01 || key).
  const kh = (await sha256(concat(enc.encode(k.name + "\n"), k.raw))).slice(0, 4);
  const key = await crypto.subtle.importKey("raw", k.key, { name: "Ed25519" }, false, ["verify"]);
  for (const line of sigs) {
    const m = /^\u2014 (\S+) (\S+)$/.exec(line);
    if (!m || m[1] !== k.name) continue;
    const sig = b64(m[2]);
    if (sig.length !== 68 || !equal(sig.slice(0, 4), kh)) continue;
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, sig.slice(4), enc.encode(body));
    if (ok) {
      const lines = body.split("\n");
      return { origin: lines[0], size: BigInt(lines[1]), root: b64(lines[2]) };
    }
  }
  throw new Error("no signature by the verifier key verifies");
}

/**
 * Verifies an inclusion proof answer (GET /api/v1/audit/entries/{id}/proof) under a
 * verifier key: the checkpoint's signature, the entry's leaf hash, and the path from
 * the leaf to the signed root. Answers the steps' results; `ok` only if all hold.
 */
export async function verifyProof(p, vkey) {
  const steps = { signature: false, leaf: false, inclusion: false };
  const signed = await verifyNote(p.checkpoint, vkey);
  steps.signature = true;
  const leaf = await leafHash(enc.encode(p.entry));
  steps.leaf = equal(leaf, b64(p.leaf_hash));
  if (signed.size !== BigInt(p.tree_size)) throw new Error("the proof's tree size is not the signed one");
  const root = await rootFromInclusion(leaf, p.entry_id, p.tree_size, p.proof.map(b64));
  steps.inclusion = root !== null && equal(root, signed.root);
  return { ...steps, ok: steps.signature && steps.leaf && steps.inclusion, signed };
}
