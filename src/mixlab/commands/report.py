"""`mixlab report DIR [DIR ...]`: one row per training run found under the folders given, and plots."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def configure(p):
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="run directories, or folders holding them at any depth (e.g. a `mixlab compare --out`)")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")
    p.add_argument("--out", metavar="FILE", help="write the table here instead of printing it")
    p.add_argument("--plots", nargs="?", const="", default=None, metavar="PLOT_DIR",
                   help="also draw accuracy vs params / MACs / wall time and the validation curves "
                        "(PNG files in PLOT_DIR; default: beside --out, else in the first DIR)")
    p.add_argument("--sort", choices=["name", "test", "val", "params", "macs", "wall"], default="name")
    p.add_argument("--measure", action="store_true",
                   help="time inference of each run's model (as `mixlab bench --mode infer`, on the run's "
                        "device and precision) and keep it in RUN_DIR/bench_infer.json; without it the "
                        "table shows earlier measurements only")
    p.add_argument("--remeasure", action="store_true", help="with --measure: measure runs that already have one too")
    p.add_argument("--bench-batch-size", type=int, default=128)
    p.add_argument("--bench-windows", type=int, default=5)
    p.add_argument("--bench-window-seconds", type=float, default=1.0)


def run(args) -> int:
    from ..analysis.report import SORT_KEYS, collect_runs, format_table, make_plots, measure_inference, write_table

    runs = collect_runs(args.dirs)
    if not runs:
        raise UsageError(f"no training runs under {', '.join(args.dirs)} (a run directory holds config.yaml, "
                         "metrics.jsonl or summary.json)")
    runs.sort(key=SORT_KEYS[args.sort])
    if args.measure:
        for r in runs:
            if r.infer_images_per_sec is not None and not args.remeasure:
                continue
            try:
                ips = measure_inference(r, batch_size=args.bench_batch_size, windows=args.bench_windows,
                                        window_seconds=args.bench_window_seconds)
                print(f"measured {r.run}: {ips:.0f} img/s inference on {r.infer_device}", flush=True)
            except Exception as e:  # noqa: BLE001 - one run that cannot be timed must not stop the report
                print(f"not measured {r.run}: {type(e).__name__}: {e}", flush=True)
    text = format_table(runs, args.format)
    plots = []
    if args.plots is not None:
        plot_dir = Path(args.plots) if args.plots else (Path(args.out).parent if args.out else Path(args.dirs[0]))
        plots = make_plots(runs, plot_dir)
    if args.out:
        write_table(text, args.out, args.format, plots)
        print(f"wrote {Path(args.out)}")
    else:
        print(text)
    for p in plots:
        print(f"wrote {p}")
    return 0
