"""Reliability tests (issue 9): crashes, target faults, hostile input, resources, access."""
