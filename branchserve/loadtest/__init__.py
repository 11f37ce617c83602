"""Load tests: locust users with real Fashion-MNIST images, budgets, and the `branchserve loadtest` runner."""
