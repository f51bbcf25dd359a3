"""`mixlab compare --models a,b,c --recipe R --out DIR`: train several models alike, one after another."""
from __future__ import annotations


def configure(p):
    p.add_argument("--models", required=True, metavar="A,B,C", help="registered model names (see `mixlab models`)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the runs: one DIR/<model>/ run each")
    p.add_argument("--recipe", help="a shipped recipe, the same for every model (see `mixlab recipes`)")
    p.add_argument("--config", help="a YAML file of settings (same keys as the recipes)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--data", help="data root (default: $MIXLAB_DATA, then ~/.cache/mixlab/data)")
    p.add_argument("--dataset", help="cifar10 (default), cifar100, or folder")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="one seed for every model (default: the recipe's)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every model, e.g. --set optimizer.lr=0.01")
    p.add_argument("--only", metavar="A,B", help="train only these of --models this time")
    p.add_argument("--keep-going", action="store_true", help="when a model fails, go on with the next one")
    p.add_argument("--dry-run", action="store_true", help="print what would be trained, skipped or resumed")
    p.add_argument("--no-report", action="store_true", help="do not print the comparison table at the end")


def run(args) -> int:
    from ..train.compare import parse_model_list, run_compare

    results = run_compare(
        parse_model_list(args.models), args.out, args.recipe, epochs=args.epochs, data=args.data,
        config_file=args.config, overrides=args.set, only=parse_model_list(args.only, "--only") or None,
        keep_going=args.keep_going, dry_run=args.dry_run, dataset=args.dataset, batch_size=args.batch_size,
        seed=args.seed, device=args.device, precision=args.precision)
    if args.dry_run:
        return 0
    failed = [r["model"] for r in results if r["status"] == "failed"]
    if not args.no_report:
        from ..analysis.report import collect_runs, format_table

        from pathlib import Path

        runs = collect_runs([r["run_dir"] for r in results if Path(r["run_dir"]).is_dir()])
        if runs:
            print()
            print(format_table(runs, "md"))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (rerun the same command to retry them)")
        return 1
    return 0
