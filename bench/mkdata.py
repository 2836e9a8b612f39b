#!/usr/bin/env python3
"""Makes a benchmark data set: N uncompressed fake NARs with matching narinfos (nix-base32
file hashes), laid out as a binary cache directory (for nginx) and as a list of uploads (for nip)."""
import hashlib, os, sys

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"

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

def main():
    out, count, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.makedirs(f"{out}/cache/nar", exist_ok=True)
    with open(f"{out}/cache/nix-cache-info", "w") as f:
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    entries = []
    for i in range(count + 1):
        size = big_mib * 1024 * 1024 if i == count else 512
        nar = os.urandom(size)
        d = nix32(hashlib.sha256(nar).digest())
        h = nix32(os.urandom(20))
        name = f"{d}.nar"
        with open(f"{out}/cache/nar/{name}", "wb") as f:
            f.write(nar)
        info = (f"StorePath: /nix/store/{h}-bench-{i}\nURL: nar/{name}\nCompression: none\n"
                f"FileHash: sha256:{d}\nFileSize: {size}\nNarHash: sha256:{d}\nNarSize: {size}\nReferences: \n")
        with open(f"{out}/cache/{h}.narinfo", "w") as f:
            f.write(info)
        entries.append((h, name))
    with open(f"{out}/narinfos.txt", "w") as f:
        f.writelines(f"/{h}.narinfo\n" for h, _ in entries[:-1])
    with open(f"{out}/big.txt", "w") as f:
        f.write(f"/nar/{entries[-1][1]}\n")
    with open(f"{out}/uploads.txt", "w") as f:
        f.writelines(f"{h} {n}\n" for h, n in entries)

main()
