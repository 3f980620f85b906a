"""Load testing (load_test.py): scenario files, a runner that sends at a target rate or as fast as the
stack takes it, metrics with latency percentiles, and a report with plots.

May import: conveyor.dispatch, conveyor.monitor, conveyor.stack and the layers below them.
"""
