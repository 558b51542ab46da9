"""Routing rules (SPEC §4): the `when` language, rules.toml, and what a series gets.

`expr` compiles expressions safely, `config` loads and validates rules.toml into frozen
dataclasses, `decide` applies a rule set to the instances of one series. No click here: the
`rules` and `route` commands sit on top.
"""

from __future__ import annotations
