"""`mixlab recipes`: the shipped training recipes."""
from __future__ import annotations


def configure(p):
    p.add_argument("name", nargs="?", help="print this recipe's YAML")


def run(args) -> int:
    from importlib import resources

    from ..train.config import list_recipes, load_recipe

    if args.name:
        load_recipe(args.name)  # raises with the list of names if unknown
        print((resources.files("mixlab") / "recipes" / f"{args.name}.yaml").read_text(), end="")
        return 0
    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, desc in recipes.items():
        seg = load_recipe(name).get("task") == "segmentation"
        print(f"{name:<{width}}  {'[mixlab seg train] ' if seg else ''}{desc}")
    return 0
