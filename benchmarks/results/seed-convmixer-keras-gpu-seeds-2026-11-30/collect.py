import json, os, sys, statistics as st
root = sys.argv[1]; groups = {}
for name in sorted(os.listdir(root)):
    m = os.path.join(root, name, "metrics.jsonl")
    rows = [json.loads(l) for l in open(m) if l.strip()] if os.path.exists(m) else []
    val = [round(r["val_acc"], 2) for r in rows]
    s = os.path.join(root, name, "summary.json")
    j = json.load(open(s)) if os.path.exists(s) else {}
    last = rows[-1] if rows else {}
    print(f"{name}: test {j.get('test_acc')} best_val {max(val) if val else None} vals {val} "
          f"train_acc_last {last.get('train_acc')} epoch_s {last.get('epoch_seconds')}")
    if j.get("test_acc") is not None:
        groups.setdefault(name.rstrip("0123456789"), []).append(round(j["test_acc"], 2))
for g, v in groups.items():
    print(f"GROUP {g}: n={len(v)} mean {st.mean(v):.2f} sd {st.stdev(v) if len(v)>1 else 0:.2f} min {min(v):.2f} max {max(v):.2f} {v}")
