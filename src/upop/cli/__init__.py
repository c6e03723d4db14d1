"""The ``upop`` command line: the parser (imports no torch), the commands, and the demo."""
