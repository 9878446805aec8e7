"""The command line `ia3-trainer`: `main` parses the arguments, runs one command module and formats the package's
errors as one line; each other module here is one command.

May import every other part of the package; nothing imports it.
"""
