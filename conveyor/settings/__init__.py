"""Settings: the config file's one typed schema and the environment, each read and validated once.

Owns: config.py (the schema of test-config.yml, errors with file, line and field) and
environment.py (which broker, result backend, record store and run directory to use).
May import: conveyor.errors, and third-party libraries. Nothing else of conveyor.
"""
