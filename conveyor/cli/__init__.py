"""What the command-line programs share: logging set-up, one-line errors, opening the app.

May import: any layer of conveyor; nothing but the top-level scripts and conveyor.__main__ imports it.
"""
