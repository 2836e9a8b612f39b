#!/usr/bin/env python3
"""Benchmark data: a signed binary cache made of fake NARs (`make`), random files
(`write_random`) and a large narinfo index written straight into nip's SQLite database
(`fill_narinfos`)."""
import base64, hashlib, json, os, random, sqlite3, subprocess, time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
KEY_NAME = "bench-upstream-1"
MEDIUM_MIB = 16


def nix32(b: bytes) -> str:
    n = (len(b) * 8 + 4) // 5
    out = []
    for i in range(n - 1, -1, -1):
        bit = i * 5
        j, k = divmod(bit, 8)
        c = b[j] >> k
        if j + 1 < len(b):
            c |= b[j + 1] << (8 - k)
        out.append(ALPHABET[c & 0x1f])
    return "".join(out)


def write_random(path, size):
    """Random (incompressible) bytes, written in 1 MiB pieces; returns their sha256 digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 1 << 20))
            h.update(piece)
            f.write(piece)
            left -= len(piece)
    return h.digest()


def add_entry(cache, key, label, size):
    """One NAR of SIZE random bytes and its signed narinfo; returns (store hash, NAR file name)."""
    digest = nix32(write_random(f"{cache}/nar/tmp", size))
    name = f"{digest}.nar"
    os.replace(f"{cache}/nar/tmp", f"{cache}/nar/{name}")
    h = nix32(os.urandom(20))
    path = f"/nix/store/{h}-bench-{label}"
    fingerprint = f"1;{path};sha256:{digest};{size};"
    sig = base64.b64encode(key.sign(fingerprint.encode())).decode()
    with open(f"{cache}/{h}.narinfo", "w") as f:
        f.write(f"StorePath: {path}\nURL: nar/{name}\nCompression: none\nFileHash: sha256:{digest}\n"
                f"FileSize: {size}\nNarHash: sha256:{digest}\nNarSize: {size}\nReferences: \n"
                f"Sig: {KEY_NAME}:{sig}\n")
    return {"hash": h, "nar": name, "size": size}


def make(out, count, big_mib):
    """COUNT small uncompressed fake NARs, one MEDIUM and one BIG one, with matching narinfos
    signed by a fresh ed25519 key (so `nip serve` accepts them from an upstream), laid out as a
    binary cache directory (for nginx: the static peer and the upstream); narinfos.txt lists the
    small ones' paths for wrk. Returns the manifest (also written as manifest.json)."""
    cache = f"{out}/cache"
    os.makedirs(f"{cache}/nar", exist_ok=True)
    with open(f"{cache}/nix-cache-info", "w") as f:
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    small = [add_entry(cache, key, str(i), 512) for i in range(count)]
    manifest = {
        "cache": cache,
        "narinfos": f"{out}/narinfos.txt",
        "public_key": f"{KEY_NAME}:{base64.b64encode(public).decode()}",
        "small": small,
        "medium": add_entry(cache, key, "medium", MEDIUM_MIB << 20),
        "big": add_entry(cache, key, "big", big_mib << 20),
        # A throwaway key of this run's fake upstream: scenarios sign entries of their own with it.
        "signing_key": base64.b64encode(key.private_bytes_raw()).decode(),
    }
    with open(manifest["narinfos"], "w") as f:
        f.writelines(f"/{e['hash']}.narinfo\n" for e in small)
    with open(f"{out}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return manifest


def add_compressed(cache, signing_key, label, nar, compression):
    """The NAR file `nar` compressed with the `zstd` or `xz` command (multithreaded, fast levels)
    into the cache, with its signed narinfo (FileHash of the compressed bytes, NarHash of the
    NAR); returns (store hash, NAR file name, compressed size)."""
    nar_digest = hashlib.sha256()
    with open(nar, "rb") as f:
        while piece := f.read(1 << 20):
            nar_digest.update(piece)
    nar_size = os.path.getsize(nar)
    ext, cmd = {"zstd": (".zst", ["zstd", "-q", "-3", "-T2", "-c", nar]),
                "xz": (".xz", ["xz", "-0", "-T2", "-c", nar])}[compression]
    tmp = f"{cache}/nar/tmp{ext}"
    with open(tmp, "wb") as out:
        subprocess.run(cmd, stdout=out, check=True)
    file_digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        while piece := f.read(1 << 20):
            file_digest.update(piece)
    file_hash, file_size = nix32(file_digest.digest()), os.path.getsize(tmp)
    name = f"{file_hash}.nar{ext}"
    os.replace(tmp, f"{cache}/nar/{name}")
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(signing_key))
    h = nix32(os.urandom(20))
    path = f"/nix/store/{h}-bench-{label}"
    nar_hash = nix32(nar_digest.digest())
    sig = base64.b64encode(key.sign(f"1;{path};sha256:{nar_hash};{nar_size};".encode())).decode()
    with open(f"{cache}/{h}.narinfo", "w") as f:
        f.write(f"StorePath: {path}\nURL: nar/{name}\nCompression: {compression}\n"
                f"FileHash: sha256:{file_hash}\nFileSize: {file_size}\nNarHash: sha256:{nar_hash}\n"
                f"NarSize: {nar_size}\nReferences: \nSig: {KEY_NAME}:{sig}\n")
    return {"hash": h, "nar": name, "size": file_size, "nar_size": nar_size}


def fake_nix32(n):
    """n random nix-base32 characters; a leading 0 keeps a 52-character hash within 256 bits."""
    return "0" + "".join(random.choices(ALPHABET, k=n - 1))


def fill_narinfos(db, count):
    """Inserts COUNT narinfo rows, as if fetched from an upstream (their NARs not stored yet), in
    one transaction; returns their store path hashes."""
    now = int(time.time())
    hashes = []

    def rows():
        for i in range(count):
            h, d = fake_nix32(32), fake_nix32(52)
            hashes.append(h)
            path, name = f"/nix/store/{h}-index-{i}", f"{d}.nar"
            text = (f"StorePath: {path}\nURL: nar/{name}\nCompression: none\nFileHash: sha256:{d}\n"
                    f"FileSize: 4096\nNarHash: sha256:{d}\nNarSize: 4096\nReferences: \n"
                    f"Sig: {KEY_NAME}:{base64.b64encode(random.randbytes(64)).decode()}\n")
            yield (h, path, name, 4096, f"sha256:{d}", f"sha256:{d}", text, "http://127.0.0.1:9", now, now)

    con = sqlite3.connect(db)
    with con:
        con.executemany("INSERT INTO narinfos (hash, store_path, nar_file, file_size, file_hash, nar_hash, "
                        "narinfo, origin, created_at, last_accessed_at) VALUES (?,?,?,?,?,?,?,?,?,?)", rows())
    con.close()
    return hashes
