from rankopt.cli import _entry

_entry()
