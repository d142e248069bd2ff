"""Recipes: functions returning a complete `MetaAPOConfig`. Installed as `metaapo_nemo.recipes`."""
from metaapo_nemo.recipes.llama31_8b import recipe as llama31_8b
from metaapo_nemo.recipes.qwen25_7b import recipe as qwen25_7b
from metaapo_nemo.recipes.tiny_cpu import recipe as tiny_cpu

RECIPES = {"tiny_cpu": tiny_cpu, "llama31_8b": llama31_8b, "qwen25_7b": qwen25_7b}


def get_recipe(name: str):
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
