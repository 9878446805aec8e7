"""The recipe: its schema mechanics, the section dataclasses (the one registry of sections), loading a recipe by
name or path with `--set` overrides, the output-folder rules, the shipped recipes, and the training arguments a
recipe builds.

May import only the top modules (`errors`, `jsonfiles`, `layout`, `network`).
"""
