"""The `edgellm` command line: argument parsing and printing only; the work happens in the library."""
