"""Scheduled and one-off jobs: plain functions over the worker's database."""
