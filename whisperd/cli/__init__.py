"""The command line (`whisperd ...`): the daemon's start, the reading commands
(`status`, `jobs`, `show`), the operator's commands, `check-config`, `models`,
`doctor`. May import every package below it; the reading commands load no
engine (torch, CTranslate2), only the store.

`whisperd.cli:main` is the console script; `python -m whisperd.cli` runs it too.
"""

from whisperd.cli.commands import main

__all__ = ["main"]
