"""AMQP plumbing through kombu's public API: the topology (queues, exchanges, dead-letter bindings)
and what the broker reports about it (queue depth, consumers, the management API).

May import: conveyor.settings, conveyor.errors.
"""
