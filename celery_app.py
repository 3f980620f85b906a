"""The Celery application. Run a worker with `celery -A celery_app worker -Q queue_a`.

The config comes from CONVEYOR_CONFIG (default test-config.yml), the broker from BROKER_URL and
results from RESULT_BACKEND; see the README for the defaults.
"""

from conveyor.runtime.app import create_app

app = create_app()
