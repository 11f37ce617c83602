"""Step load: add `--step-users` paced users every `--step-seconds`, for `--steps` steps, then stop.

    locust -f loadtest/locustfile.py,loadtest/step_load.py --headless --user-rps 50 --step-users 4 ...

With paced users (`--user-rps`), each step offers `users × user-rps` requests/s; the runner reads
each step's latency percentiles from the results file and keeps the highest step that holds the
p99 budget. Kept apart from the locustfile because locust always applies a shape class it finds.
"""

from __future__ import annotations

from locust import LoadTestShape


class StepLoad(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        assert options is not None
        step = int(self.get_run_time() // options.step_seconds)
        if step >= options.steps:
            return None
        users = (step + 1) * options.step_users
        return users, users  # spawn a step's users within a second
