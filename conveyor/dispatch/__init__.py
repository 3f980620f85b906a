"""The dispatcher (dispatch.py): send a config's tasks, collect what became of each, report it.

May import: conveyor.stack and the layers below it; not conveyor.monitor, its sibling.
"""
