"""Prefect tasks: thin wrappers over mace_ood; they take and return paths and small dicts."""
