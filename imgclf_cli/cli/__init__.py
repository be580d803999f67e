"""The command-line layer: each command parses, calls one library function, renders."""
