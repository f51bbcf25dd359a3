"""Unpack the CIFAR-10 JPEG tree; with --reencode also a copy re-encoded once more (q75, 4:2:0)."""
import io, os, pickle, sys
from PIL import Image
d = pickle.load(open(os.path.join(os.path.dirname(__file__), "cifar10_jpeg.pkl"), "rb"))
out, re_out = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
for rel, b in d.items():
    p = os.path.join(out, "cifar10", rel); os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "wb").write(b)
    if re_out:
        q = os.path.join(re_out, "cifar10", rel); os.makedirs(os.path.dirname(q), exist_ok=True)
        buf = io.BytesIO(); Image.open(io.BytesIO(b)).convert("RGB").save(buf, "JPEG", quality=75); open(q, "wb").write(buf.getvalue())
print("unpacked", len(d))
