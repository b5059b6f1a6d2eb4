"""Prefect flows of mace-ood."""
