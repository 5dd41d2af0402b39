"""The application: the command line, job (run) files, the demo and its results tables.

May import every layer below (``ir``, ``infra``, ``training``); nothing imports it but the package root.
"""
